"""Any model a user brings: every decoder-only family, found not listed, through every command.

Each test runs on a tiny random model of every family in :data:`families.FAMILIES` and compares
with a computation written here: the prompt prepended as embeddings (input prompts), the keys
and values put into transformers' own cache by hand (key/value prompts), the model's own
unchunked logits (the chunked head).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from families import FAMILIES, VOCAB, family_config, family_model

# Same computation in a different order: attention over a cached past against attention over
# one concatenated sequence, chunked against whole matmuls. float32 sums of a few hundred terms
# of size ~1 round at ~1e-7 relative; 1e-5 on an NLL of ~8 nats leaves two orders of margin
# and still catches any real difference (a wrong position or a lost BOS moves NLLs by > 1e-2).
NLL_ATOL = 1e-5


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def naive_nlls(model, ids, prefix_embeds=None, past=None, start=0):
    """Next-token NLLs ``[batch, T-1]`` straight from the model's own logits: after embeddings
    prepended (``prefix_embeds`` [n, hidden]) or after a cache filled by hand (``past``)."""
    if prefix_embeds is not None:
        tok = model.get_input_embeddings()(ids)
        full = torch.cat([prefix_embeds.unsqueeze(0).expand(ids.shape[0], -1, -1), tok], dim=1)
        logits = model(inputs_embeds=full, use_cache=False).logits[:, prefix_embeds.shape[0]:]
    else:
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
        logits = model(input_ids=ids, cache=past, position_ids=positions, use_cache=True).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1)


def bos_embeds(model, bos):
    return model.get_input_embeddings()(torch.tensor([bos]))


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_are_found_from_the_model(family):
    from ctp.models import decoder_layers, find_decoder_layers, unsupported_reason

    model = family_model(family)
    name, layers = find_decoder_layers(model)
    assert len(layers) == 2 and layers is decoder_layers(model)
    assert type(layers[0]).__name__ in model._no_split_modules
    assert unsupported_reason(model.config) is None  # also from the config alone (meta device)


def test_what_ctp_cannot_handle_is_refused_before_any_weight_is_read(tmp_path, capfd):
    """A config.json alone: the refusal comes from the configuration, with the reason."""
    from transformers import AutoConfig

    from ctp.cli import main

    cases = {"mixtral": ("mixture-of-experts", dict(num_local_experts=4, num_hidden_layers=2)),
             "t5": ("encoder-decoder", {})}
    for model_type, (reason, kwargs) in cases.items():
        folder = tmp_path / model_type
        AutoConfig.for_model(model_type, **kwargs).save_pretrained(folder)
        for command in (["compress", str(folder), "--out", str(tmp_path / "out")],
                        ["eval", str(folder), "--ppl", "embedded"]):
            capfd.readouterr()
            assert main(command) == 2
            err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
            assert len(err) == 1 and reason in err[0] and model_type in err[0], err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_both_prompt_kinds_equal_a_naive_computation(family):
    """An input prompt through its cache equals its embeddings prepended; a key/value prompt
    through ctp's cache equals the same keys and values put into transformers' cache by hand.
    BOS comes first for the Gemmas (the rule), as context."""
    from transformers import DynamicCache

    from ctp.lm import bos_token, token_nlls
    from ctp.prompt.kinds import InputPrompt, KVPrompt, kv_geometry

    model = family_model(family)
    bos = bos_token("auto", model.config)
    assert (bos is not None) == family.startswith("gemma")
    ids = ids_of(2, 20)
    prompt = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * 0.3
    prefix = prompt if bos is None else torch.cat([bos_embeds(model, bos), prompt])
    with torch.no_grad():
        want = naive_nlls(model, ids, prefix_embeds=prefix)
        got = token_nlls(model, ids, InputPrompt(prompt).cache(model, bos))
    assert (got - want).abs().max().item() < NLL_ATOL

    g = kv_geometry(model)
    kv = KVPrompt(torch.randn(4, g.width, generator=torch.Generator().manual_seed(2)) * 0.5, g)
    keys, values = kv.keys_values()
    with torch.no_grad():
        past = DynamicCache(config=model.config)
        if bos is not None:
            model(input_ids=torch.tensor([[bos], [bos]]), cache=past, use_cache=True)
        for i in range(g.layers):
            past.layers[i].update(keys[i].unsqueeze(0).expand(2, -1, -1, -1).contiguous(),
                                  values[i].unsqueeze(0).expand(2, -1, -1, -1).contiguous())
        want = naive_nlls(model, ids, past=past, start=4 + int(bos is not None))
        got = token_nlls(model, ids, kv.cache(model, bos))
    assert (got - want).abs().max().item() < NLL_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chunked_head_equals_the_whole_logits(family, monkeypatch):
    """Losses through the output head a few tokens at a time (soft-capping, logit scales
    included) equal the model's own logits' cross-entropy, and so does the prompt's gradient."""
    import ctp.head

    model = family_model(family)
    for p in model.parameters():
        p.requires_grad_(False)
    monkeypatch.setattr(ctp.head, "CHUNK_BYTES", 4 * VOCAB * 7)  # 7 tokens per chunk
    assert ctp.head.output_head(model).chunk_tokens() == 7
    ids = ids_of(2, 19, seed=3)
    prompt = torch.nn.Parameter(torch.randn(3, 64, generator=torch.Generator().manual_seed(4)) * 0.3)
    from ctp.lm import token_nlls

    got = token_nlls(model, ids, prompt)
    got.mean().backward()
    chunked_grad = prompt.grad.clone()
    prompt.grad = None
    want = naive_nlls(model, ids, prefix_embeds=prompt)
    want.mean().backward()
    assert (got - want).abs().max().item() < NLL_ATOL
    assert ((chunked_grad - prompt.grad).norm() / prompt.grad.norm()).item() < 1e-4


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    """Each family saved in fp16 with the embedded tokenizer (Gemma's BOS is its id 1 there)."""
    made = {}

    def make(family):
        if family not in made:
            path = tmp_path_factory.mktemp(f"family-{family}")
            family_model(family).to(torch.bfloat16 if family.startswith("gemma") else torch.float16
                                    ).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family] = path
        return str(made[family])

    return make


# The whole chain takes ~25 s a family on 2 cores: three families that differ most (Llama; Gemma 3
# with BOS, sliding windows and soft-capping; GPT-NeoX with fused qkv and partial rotary) run in
# the default suite, every family in the slow run (CI runs both).
QUICK_FAMILIES = ("llama", "gemma3_text", "gpt_neox")


@pytest.mark.parametrize("family", [f if f in QUICK_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_every_command_works_on_every_family(family, family_dirs, tmp_path):
    """compress -> eval -> tune-prompt (input and kv, next-token and distillation) -> stitch ->
    generate, on a checkpoint of the family; generation behind a prompt equals greedy decoding
    of the prompt prepended, token for token (or a near-tie of the two best logits)."""
    from ctp import CompressConfig, EvalConfig, PromptConfig
    from ctp.compression.pipeline import compress
    from ctp.evaluation.api import evaluate
    from ctp.generation import GenerateConfig, generate
    from ctp.lm import bos_token
    from ctp.models import load_any, load_tokenizer
    from ctp.prompt.stitch import stitch
    from ctp.prompt.tune import tune_prompt

    base = family_dirs(family)
    calibration = ids_of(4, 32, seed=5)
    out = tmp_path / "c"
    report = compress(base, CompressConfig(prune="wanda", quant="nf4", rounding="rtn", device="cpu"),
                      out, calibration=calibration, progress=False).report
    assert abs(report["sparsity_after_pruning"]["overall"] - 0.5) < 0.01
    train, val = ids_of(1, 2000, seed=6).flatten(), ids_of(1, 400, seed=7).flatten()
    common = dict(num_virtual_tokens=4, steps=2, lr=0.01, seqlen=32, batch_size=2, eval_every=2,
                  eval_windows=4, device="cpu")
    tok = load_tokenizer(str(out))
    for kind, objective in (("input", "nll"), ("kv", "kd")):
        folder = tmp_path / f"p-{kind}"
        result = tune_prompt(str(out), PromptConfig(prompt_type=kind, objective=objective, **common),
                             folder, train_ids=train, val_ids=val, tokenizer=tok, progress=False)
        meta = json.loads((folder / "ctp_prompt.json").read_text())
        assert meta["prompt_type"] == kind and meta["objective"] == objective
        assert meta["bos_token_id"] == bos_token("auto", family_config(family), tok)
        assert result.meta["best_val_ppl"] <= result.meta["val_ppl_without_prompt"] * 1.5
        measured = evaluate(str(out), EvalConfig(ppl=[str(_text(tmp_path))], seqlen=32, device="cpu"),
                            prompt=str(folder), progress=False, with_and_without=True)
        assert measured["prompt_type"] == kind and measured["bos_token_id"] == meta["bos_token_id"]
        pair = stitch(str(folder), str(out), device="cpu")
        assert pair.prompt.kind == kind and not pair.warnings
    gen = generate(str(out), ["import numpy as np\n", "def f(x):"], str(tmp_path / "p-kv"),
                   GenerateConfig(max_new_tokens=4, compare=True, device="cpu"))
    assert len(gen["outputs"]) == 4 and gen["prompt_type"] == "kv"
    _greedy_equals_prepended(load_any(str(out), device="cpu"), tok, str(tmp_path / "p-input"))


def _text(tmp_path):
    path = tmp_path / "text.txt"
    if not path.exists():
        words = "the model reads a window of tokens and predicts the next one " * 40
        path.write_text(words)
    return path


def _greedy_equals_prepended(model, tok, prompt_dir):
    from ctp.generation import GenerateConfig, load_generator
    from ctp.lm import bos_token
    from ctp.prompt.kinds import load_prompt
    from ties import GREEDY_ATOL, GREEDY_FLIPS, TieBudget

    prompt = load_prompt(prompt_dir).tensor
    bos = bos_token("auto", model.config, tok)
    text = "def add(a, b):"
    got = load_generator(model, prompt_dir, GenerateConfig(max_new_tokens=5, device="cpu"),
                         tokenizer=tok).generate(text)[0].token_ids
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = prompt if bos is None else torch.cat([bos_embeds(model, bos), prompt])
    budget = TieBudget(GREEDY_FLIPS, atol=GREEDY_ATOL, what="greedy behind the prompt")
    with torch.no_grad():
        for step, token in enumerate(got):  # the reference follows the choice made at a near-tie
            tokens = model.get_input_embeddings()(torch.tensor([ids]))
            logits = model(inputs_embeds=torch.cat([prefix.unsqueeze(0), tokens], 1), use_cache=False).logits[0, -1]
            budget.token(token, logits.float(), f"step {step}")
            ids.append(token)
