"""The prompt cache computes what the prepended prompt computes, in every family: perplexity,
loglikelihoods with left padding, greedy decoding; it holds n x layers x 2 x kv_heads x head_dim
values once and lends them to a batch without copying."""

import math

import pytest
import torch

from conftest import ARCH_NAMES, calib_ids, tiny_config, tiny_model
from ctp.errors import CTPError
from ctp.lm import (PromptCache, build_prompt_cache, decode, prompted_logits, token_nlls, token_picker,
                    window_nlls)
from ties import GREEDY_ATOL, GREEDY_FLIPS, TieBudget

N = 7  # virtual tokens


def random_prompt(n=N, hidden=64, seed=1):
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)) * 0.5


def prepended_logits(model, prompt, ids):
    """Logits ``[T, vocab]`` of 1-D ``ids`` with the prompt's embeddings prepended, its positions dropped."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids.unsqueeze(0))
        return model(inputs_embeds=torch.cat([prompt.unsqueeze(0), emb], 1)).logits[0, prompt.shape[0]:]


def naive_greedy(model, prompt, ids, steps, follow=None, ties=None):
    """Greedy decoding by full forward passes over [prompt, ids, new], no cache. ``follow``:
    the tokens under test, each checked by ``ties`` to be the argmax here or a near-tie with
    it, and then taken, so that the next step is compared on the same text."""
    new = []
    for t in range(steps):
        logits = prepended_logits(model, prompt, torch.tensor(ids + new))[-1]
        new.append(ties.token(follow[t], logits, f"step {t}") if follow and t < len(follow)
                   else int(logits.argmax()))
    return new


def assert_greedy(got, model, prompt, ids, steps, ties):
    """``got`` is what naive greedy decoding gives, but for near-ties (checked by ``ties``)."""
    assert got == naive_greedy(model, prompt, ids, steps, follow=got, ties=ties)


def greedy_ties(what):
    return TieBudget(GREEDY_FLIPS, atol=GREEDY_ATOL, what=what)


def left_padded(rows, pad=3):
    """``(ids, mask)`` ``[batch, longest]`` with each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_cached_perplexity_equals_the_prepended_prompt_batched_and_not(arch):
    model, prompt = tiny_model(arch), random_prompt()
    windows = calib_ids(5, 24, seed=2)
    with torch.no_grad():
        prepended = token_nlls(model, windows, prompt).mean(dim=1).double()
    bare = window_nlls(model, windows)
    for batch_size in (1, 2, 5):
        cached = window_nlls(model, windows, prompt, batch_size=batch_size)
        assert math.exp(cached.mean()) == pytest.approx(math.exp(prepended.mean()), rel=1e-5)
        torch.testing.assert_close(cached, prepended, rtol=1e-5, atol=1e-6)
    assert (window_nlls(model, windows, prompt) - bare).abs().max() > 1e-3  # the prompt is there
    given = window_nlls(model, windows, build_prompt_cache(model, prompt), batch_size=2)
    torch.testing.assert_close(given, prepended, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_left_padded_rows_score_what_they_score_alone(arch):
    model, prompt = tiny_model(arch), random_prompt()
    rows = [calib_ids(1, length, seed=length)[0].tolist() for length in (5, 17, 11)]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        logits, _ = prompted_logits(model, ids, build_prompt_cache(model, prompt), mask)
    for i, row in enumerate(rows):
        want = prepended_logits(model, prompt, torch.tensor(row)).log_softmax(-1)
        got = logits[i, ids.shape[1] - len(row):].log_softmax(-1)
        # the loglikelihood of every continuation token, as lm-eval sums them
        targets = torch.tensor(row[1:])
        assert (got[:-1].gather(1, targets[:, None]) - want[:-1].gather(1, targets[:, None])).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_greedy_decoding_equals_the_prepended_prompt(arch):
    model, prompt = tiny_model(arch), random_prompt()
    rows = [calib_ids(1, length, seed=length)[0].tolist() for length in (4, 13)]
    cache = build_prompt_cache(model, prompt)
    ties = greedy_ties(arch)
    ids, mask = left_padded(rows)
    batched = torch.stack(list(decode(model, ids, cache, mask, max_new_tokens=8)), dim=1)
    for row, got in zip(rows, batched.tolist()):
        assert_greedy(got, model, prompt, row, 8, ties)
        alone = [int(t) for t in decode(model, torch.tensor([row]), cache, max_new_tokens=8)]
        assert_greedy(alone, model, prompt, row, 8, ties)  # unbatched, no mask


@pytest.mark.parametrize("arch, settings, layer_types", [
    ("mistral", {"sliding_window": 8}, None),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8}, ["full_attention", "sliding_attention"]),
])
def test_sliding_window_layers_keep_what_they_would_after_the_prompt(arch, settings, layer_types):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    for key, value in settings.items():
        setattr(config, key, value)
    if layer_types:
        config.layer_types = layer_types
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    prompt, windows = random_prompt(12), calib_ids(2, 20, seed=5)  # the prompt outgrows the window
    cache = build_prompt_cache(model, prompt)
    assert [k.shape[2] for k in cache.keys] == [12 if t == "full_attention" else 7
                                                for t in (layer_types or ["sliding_attention"] * 2)]
    with torch.no_grad():
        prepended = token_nlls(model, windows, prompt).mean(dim=1).double()
    torch.testing.assert_close(window_nlls(model, windows, cache, batch_size=2), prepended,
                               rtol=1e-5, atol=1e-6)
    row = windows[0, :6].tolist()
    got = [int(t) for t in decode(model, torch.tensor([row]), cache, max_new_tokens=6)]
    assert_greedy(got, model, prompt, row, 6, greedy_ties(arch))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_the_cache_holds_n_layers_2_kv_heads_head_dim_values_lent_without_copies(arch):
    model, prompt = tiny_model(arch), random_prompt()
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    cache = build_prompt_cache(model, prompt)
    assert cache.numel == N * config.num_hidden_layers * 2 * kv_heads * head_dim
    assert cache.nbytes == cache.numel * 4 and not cache.keys[0].requires_grad
    past = cache.past(batch_size=6)
    for layer, keys, values in zip(past.layers, cache.keys, cache.values):
        assert layer.keys.shape == (6, kv_heads, N, head_dim) and layer.keys.stride(0) == 0
        assert layer.keys.data_ptr() == keys.data_ptr() and layer.values.data_ptr() == values.data_ptr()
    assert cache.past(2) is not cache.past(2)  # a fresh cache for every forward pass


def test_evaluation_builds_the_cache_once_per_call(monkeypatch):
    import ctp.lm as lm
    from ctp.evaluation.perplexity import perplexity_of_ids

    built = []
    real = lm.build_prompt_cache
    monkeypatch.setattr(lm, "build_prompt_cache", lambda *a: built.append(1) or real(*a))
    model = tiny_model("llama")
    result = perplexity_of_ids(model, calib_ids(1, 24 * 6, seed=1).flatten(), 24, random_prompt(), batch_size=1)
    assert result.windows == 6 and len(built) == 1


def test_a_four_bit_compressed_model_scores_and_decodes_like_the_prepended_prompt(tmp_path, tiny_dir):
    from ctp.compression.pipeline import compress
    from ctp.config import CompressConfig
    from ctp.models import load_any

    folder = compress(str(tiny_dir("llama")), CompressConfig(prune="magnitude", quant="nf4"),
                      tmp_path / "nf4", progress=False).out
    model, prompt = load_any(str(folder), device="cpu"), random_prompt()
    windows = calib_ids(3, 20, seed=7)
    with torch.no_grad():
        prepended = token_nlls(model, windows, prompt).mean(dim=1).double()
    cached = window_nlls(model, windows, prompt, batch_size=3)
    assert math.exp(cached.mean()) == pytest.approx(math.exp(prepended.mean()), rel=1e-5)
    row = windows[0, :5].tolist()
    got = [int(t) for t in decode(model, torch.tensor([row]), build_prompt_cache(model, prompt), max_new_tokens=6)]
    assert_greedy(got, model, prompt, row, 6, greedy_ties("nf4"))


def test_decoding_stops_rows_at_eos_and_pads_them():
    model, prompt = tiny_model("llama"), random_prompt()
    cache = build_prompt_cache(model, prompt)
    rows = [calib_ids(1, 6, seed=1)[0].tolist(), calib_ids(1, 9, seed=2)[0].tolist()]
    ids, mask = left_padded(rows)
    free = torch.stack(list(decode(model, ids, cache, mask, max_new_tokens=5)), 1)
    eos_ids = (int(free[0, 1]), int(free[1, 2]))  # play EOS: row 0 ends by step 2, row 1 by step 3
    steps = torch.stack(list(decode(model, ids, cache, mask, max_new_tokens=5, eos_ids=eos_ids, pad_id=2047)), 1)
    hit = [torch.isin(row, torch.tensor(eos_ids)) for row in free]
    ends = [int(h.nonzero()[0]) + 1 for h in hit]
    assert ends[0] <= 2 and ends[1] <= 3
    assert steps.shape[1] == max(ends) < 5  # decoding ends as soon as every row has
    for row, got, end in zip(free, steps, ends):  # noqa: B007
        assert got[:end].tolist() == row[:end].tolist() and (got[end:] == 2047).all()


def test_sampling_is_seeded_and_top_p_keeps_the_likeliest_mass():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(500, 1)
    draw = lambda seed, **kw: token_picker(1.0, generator=torch.Generator().manual_seed(seed), **kw)(logits)
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    probs = logits[0].softmax(-1)
    assert set(draw(0, top_p=float(probs[0]) + 1e-3).tolist()) == {0, 1}  # 0 alone falls short
    assert set(draw(0, top_p=float(probs[0]) - 1e-3).tolist()) == {0}
    assert set(draw(0, top_k=1).tolist()) == {0}
    assert len(set(draw(0).tolist())) > 2
    assert token_picker()(logits).unique().tolist() == [0]
    with pytest.raises(CTPError):
        token_picker(0.5, top_p=0.0)


def test_a_cache_of_another_model_or_a_prompt_of_another_width_is_refused():
    model = tiny_model("llama")
    with pytest.raises(CTPError, match="hidden size 32 differs"):
        build_prompt_cache(model, random_prompt(hidden=32))
    other = build_prompt_cache(tiny_model("llama", seed=1), random_prompt())
    assert isinstance(other, PromptCache)
    with pytest.raises(CTPError, match="another model"):
        window_nlls(model, calib_ids(1, 8), other)
    with pytest.raises(CTPError, match="context of 256"):
        window_nlls(model, calib_ids(1, 250), random_prompt())
