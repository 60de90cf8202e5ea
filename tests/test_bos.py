"""BOS where the family needs it: one rule (auto|always|never) in calibration, training,
validation, evaluation, the transfer matrix, the lm-eval plugin and generation, checked against
hand computations on a tiny Gemma 3 (BOS, then the prompt, then the text; BOS never scored)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from families import VOCAB, family_model

NLL_ATOL = 1e-5  # see tests/test_families.py


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gemma3")
    family_model("gemma3_text").to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"token{i % 97} value{i % 13}" for i in range(1500)))
    return path


def hand_ppl(model, windows, prefix=None):
    """exp(mean over windows of the mean NLL of window[1:]), each window read after ``prefix``
    embeddings ``[k, hidden]`` (BOS, prompt, ...), whose positions are never scored."""
    nlls = []
    with torch.no_grad():
        for window in windows:
            embeds = model.get_input_embeddings()(window.unsqueeze(0))
            if prefix is not None:
                embeds = torch.cat([prefix.unsqueeze(0), embeds], dim=1)
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -window.numel():]
            nlls.append(F.cross_entropy(logits[:-1].float(), window[1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def test_the_rule(tokenizer):
    from ctp.lm import bos_token, family_needs_bos
    from families import family_config

    gemma, llama = family_config("gemma3_text"), family_config("llama")
    assert family_needs_bos(gemma) and not family_needs_bos(llama)
    assert bos_token("auto", gemma, tokenizer) == tokenizer.bos_token_id  # the tokenizer's id
    assert bos_token("auto", gemma) == gemma.bos_token_id  # else the config's
    assert bos_token("auto", llama, tokenizer) is None
    assert bos_token("always", llama, tokenizer) == tokenizer.bos_token_id
    assert bos_token("never", gemma, tokenizer) is None


def test_gemma_perplexity_reads_bos_before_every_window(gemma_dir, text_file, tokenizer):
    from ctp.data import load_text, tokenize
    from ctp.evaluation.api import perplexity
    from ctp.lm import windows_of
    from ctp.models import load_any

    model = load_any(gemma_dir, device="cpu")
    windows = windows_of(tokenize(tokenizer, load_text(str(text_file))), 40, max_windows=6)
    bos = model.get_input_embeddings()(torch.tensor([tokenizer.bos_token_id]))
    with_bos = perplexity(model, tokenizer, str(text_file), seqlen=40, max_windows=6)
    assert with_bos.bos and with_bos.tokens_scored == 6 * 39  # the same targets as without BOS
    assert with_bos.ppl == pytest.approx(hand_ppl(model, windows, bos), rel=NLL_ATOL)
    without = perplexity(model, tokenizer, str(text_file), seqlen=40, max_windows=6, bos="never")
    assert not without.bos and without.ppl == pytest.approx(hand_ppl(model, windows), rel=NLL_ATOL)
    prompt = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 0.3
    prompted = perplexity(model, tokenizer, str(text_file), seqlen=40, max_windows=6, prompt=prompt)
    assert prompted.ppl == pytest.approx(hand_ppl(model, windows, torch.cat([bos, prompt])), rel=NLL_ATOL)


def test_bos_is_recorded_and_used_in_calibration_training_and_eval(gemma_dir, text_file, tmp_path,
                                                                    tokenizer, monkeypatch):
    """Calibration windows start with BOS; validation at step 0 equals the hand computation of
    (BOS, init prompt, window); every artifact and JSON records the BOS id."""
    import ctp.compression.calibrate as calibrate
    from ctp import CompressConfig, EvalConfig, PromptConfig
    from ctp.compression.pipeline import compress
    from ctp.data import load_text, tokenize
    from ctp.evaluation.api import evaluate
    from ctp.evaluation.transfer import transfer
    from ctp.lm import spread_windows
    from ctp.models import load_any
    from ctp.prompt.tune import tune_prompt

    bos = tokenizer.bos_token_id
    seen = []
    real = calibrate.capture_layer_inputs
    monkeypatch.setattr(calibrate, "capture_layer_inputs",
                        lambda model, ids, *a, **k: seen.append(ids) or real(model, ids, *a, **k))
    out = tmp_path / "c"
    report = compress(gemma_dir, CompressConfig(prune="wanda", quant="nf4", rounding="rtn", calib=str(text_file),
                                                nsamples=4, seqlen=24, device="cpu"), out, progress=False).report
    assert seen and seen[0].shape == (4, 25) and bool((seen[0][:, 0] == bos).all())
    assert report["calibration"]["bos_token_id"] == bos and report["compression"]["bos"] == "auto"

    ids = tokenize(tokenizer, load_text(str(text_file)))
    config = PromptConfig(prompt_type="input", objective="nll", init="vocab", num_virtual_tokens=3, steps=1,
                          lr=1e-9, seqlen=30, batch_size=2, eval_every=1, eval_windows=None, device="cpu")
    result = tune_prompt(str(out), config, tmp_path / "p", train_ids=ids, val_ids=ids, tokenizer=tokenizer,
                         progress=False)
    meta = json.loads((tmp_path / "p" / "ctp_prompt.json").read_text())
    assert meta["bos_token_id"] == bos and meta["prompt_config"]["bos"] == "auto"
    model = load_any(str(out), device="cpu")
    bos_embed = model.get_input_embeddings()(torch.tensor([bos]))
    init = model.get_input_embeddings().weight[:3].detach()  # init vocab: the first rows
    windows = spread_windows(ids, 30, None)
    assert meta["history"]["val_ppl"][0] == pytest.approx(hand_ppl(model, windows, torch.cat([bos_embed, init])),
                                                         rel=NLL_ATOL)
    assert meta["val_ppl_without_prompt"] == pytest.approx(hand_ppl(model, windows, bos_embed), rel=NLL_ATOL)

    measured = evaluate(str(out), EvalConfig(ppl=[str(text_file)], seqlen=30, device="cpu"),
                        prompt=str(tmp_path / "p"), progress=False)
    assert measured["bos_token_id"] == bos and measured["details"]["text.txt"]["bos"]
    matrix = transfer([str(tmp_path / "p")], [str(out)], data=str(text_file), seqlen=30, dense=gemma_dir,
                      device="cpu", progress=False)
    assert matrix["bos"] == "auto"
    assert matrix["cells"][0][0]["ppl"] == pytest.approx(measured["ppl"]["text.txt"], rel=1e-9)
    assert result.meta["bos_token_id"] == bos


def test_lm_eval_plugin_puts_the_prompt_after_bos(gemma_dir, tmp_path, tokenizer):
    """--model ctp on a BOS family: HFLM's requests start with BOS, which the plugin moves into the
    prompt's cache (BOS, prompt, text); scores equal the hand computation, and the first token
    after BOS is scored as without the prompt."""
    from lm_eval.api.instance import Instance

    from ctp.artifacts import write_prompt_folder
    from ctp.evaluation.lm_eval_plugin import CTPLM
    from ctp.models import load_any, tokenizer_fingerprint

    prompt = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.3
    folder = tmp_path / "prompt"
    folder.mkdir()
    write_prompt_folder(folder, prompt, "tiny", 2, 4, {
        "num_virtual_tokens": 4, "hidden_size": 64, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "base_fingerprint": None, "prompt_config": {}, "best_val_ppl": 1.0})
    lm = CTPLM(pretrained=gemma_dir, prompt=str(folder), device="cpu", batch_size=2)
    model = load_any(gemma_dir, device="cpu")
    bos = tokenizer.bos_token_id
    pairs = [("The model reads", " the window"), ("", "import numpy")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = [score for score, _ in lm.loglikelihood(requests)]
    prefix = torch.cat([model.get_input_embeddings()(torch.tensor([bos])), prompt])
    for (context, continuation), score in zip(pairs, got):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
        ids = torch.tensor(ctx + cont)
        with torch.no_grad():
            embeds = torch.cat([prefix, model.get_input_embeddings()(ids)]).unsqueeze(0)
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0].float()
            if not ctx:  # the first token after BOS: BOS's own prediction, the prompt never earns it
                bare = model(input_ids=torch.tensor([[bos]]), use_cache=False).logits[0, -1].float()
                logits = torch.cat([logits[:prefix.shape[0] - 1], bare.unsqueeze(0), logits[prefix.shape[0]:]])
            logp = F.log_softmax(logits, dim=-1)
            start = prefix.shape[0] + len(ctx) - 1
            want = sum(logp[start + i, t].item() for i, t in enumerate(cont))
        assert score == pytest.approx(want, abs=1e-4)
    assert lm.ctp_info["bos_token_id"] == bos


def test_a_bos_the_tokenizer_adds_is_not_read_twice():
    """Tokenizers that put BOS at the start of a text (Gemma's, Llama's): under a rule that puts
    BOS before every window, the text's own leading BOS is dropped; without the rule it stays."""
    from ctp.data import tokenize

    class AddsBos:
        def __call__(self, text, **kwargs):
            return {"input_ids": [7] + [ord(c) for c in text]}

    assert tokenize(AddsBos(), "ab", bos=7).tolist() == [97, 98]
    assert tokenize(AddsBos(), "ab").tolist() == [7, 97, 98]
    assert tokenize(AddsBos(), "ab", bos=5).tolist() == [7, 97, 98]  # another id: not a BOS to drop


def test_lm_eval_generation_on_a_bos_family_equals_ctp_generate(gemma_dir, tmp_path, tokenizer):
    """generate_until through the plugin (BOS in the cache, left-padded requests) gives the greedy
    tokens `ctp generate` gives for the same inputs (BOS, prompt, text in both)."""
    from lm_eval.api.instance import Instance

    from ctp.artifacts import write_prompt_folder
    from ctp.evaluation.lm_eval_plugin import CTPLM
    from ctp.generation import GenerateConfig, generate
    from ctp.models import tokenizer_fingerprint

    prompt = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 0.3
    folder = tmp_path / "prompt"
    folder.mkdir()
    write_prompt_folder(folder, prompt, "tiny", 2, 4, {
        "num_virtual_tokens": 3, "hidden_size": 64, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "base_fingerprint": None, "prompt_config": {}, "best_val_ppl": 1.0})
    contexts = ["def add(a, b):", "import numpy as"]
    lm = CTPLM(pretrained=gemma_dir, prompt=str(folder), device="cpu", batch_size=2)
    gen = {"until": ["\n\n\n"], "max_gen_toks": 4, "do_sample": False}
    got = lm.generate_until([Instance("generate_until", {}, (c, dict(gen)), i) for i, c in enumerate(contexts)])
    ours = generate(gemma_dir, contexts, str(folder), GenerateConfig(max_new_tokens=4, device="cpu"))
    assert got == [o["text"] for o in ours["outputs"]]
