"""Two prompt kinds behind one interface: saved in PEFT's formats, loaded by PEFT, scored alike.

A key/value prompt is a PEFT prefix-tuning adapter: ``PeftModel.from_pretrained`` loads it and
PEFT's own forward and generate must give what ctp gives.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from ties import GREEDY_ATOL, GREEDY_FLIPS, TieBudget

# ctp's past against PEFT's past: the same keys and values, read by the same layers in a different
# order of operations (see tests/test_families.py)
NLL_ATOL = 1e-5


def ids_of(batch, length, seed=0):
    return torch.randint(3, 2048, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kv_prompt(tmp_path_factory, tiny_dir, tokenizer):
    """A key/value prompt tuned for 3 steps on the tiny Llama, saved by ctp."""
    from ctp import PromptConfig
    from ctp.prompt.tune import tune_prompt

    folder = tmp_path_factory.mktemp("kv") / "p"
    config = PromptConfig(prompt_type="kv", objective="nll", num_virtual_tokens=4, init="sample-vocab",
                          init_model="target",
                          steps=3, lr=0.05, seqlen=32, batch_size=2, eval_every=3, eval_windows=4, device="cpu")
    result = tune_prompt(str(tiny_dir("llama")), config, folder, train_ids=ids_of(1, 3000, 1).flatten(),
                         val_ids=ids_of(1, 600, 2).flatten(), tokenizer=tokenizer, progress=False)
    return folder, result


def test_a_kv_prompt_folder_is_a_peft_prefix_tuning_adapter(kv_prompt, tiny_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    from ctp.lm import token_nlls
    from ctp.models import load_any
    from ctp.prompt.kinds import KVPrompt, load_prompt

    folder, result = kv_prompt
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    assert config["num_layers"] == 2 and config["num_attention_heads"] == 2 and config["token_dim"] == 32
    saved = load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]
    assert saved.shape == (4, 2 * 2 * 2 * 16) and torch.equal(saved, result.prompt)
    meta = json.loads((folder / "ctp_prompt.json").read_text())
    assert (meta["prompt_type"], meta["kv_layers"], meta["kv_heads"], meta["head_dim"]) == ("kv", 2, 2, 16)
    prompt = load_prompt(folder)
    assert isinstance(prompt, KVPrompt) and torch.equal(prompt.tensor, result.prompt)

    model = load_any(str(tiny_dir("llama")), device="cpu")
    ids = ids_of(2, 24, 3)
    with torch.no_grad():
        ours = token_nlls(model, ids, prompt.cache(model))
        peft = PeftModel.from_pretrained(model, str(folder)).eval()
        logits = peft(input_ids=ids).logits
        theirs = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1), reduction="none").view(2, -1)
    assert logits.shape[1] == ids.shape[1]  # a prefix adds keys and values, no positions
    assert (ours - theirs).abs().max().item() < NLL_ATOL


def test_peft_generate_with_a_kv_prompt_equals_ctp_generate(kv_prompt, tiny_dir, tokenizer):
    from peft import PeftModel

    from ctp.generation import GenerateConfig, generate
    from ctp.models import load_any

    folder, _ = kv_prompt
    text = "import numpy as np"
    ours = generate(str(tiny_dir("llama")), [text], str(folder),
                    GenerateConfig(max_new_tokens=6, device="cpu"))["outputs"][0]["token_ids"]
    model = load_any(str(tiny_dir("llama")), device="cpu")
    peft = PeftModel.from_pretrained(model, str(folder)).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    budget = TieBudget(GREEDY_FLIPS, atol=GREEDY_ATOL, what="PEFT prefix generate")
    with torch.no_grad():
        for step, token in enumerate(ours):  # PEFT's own forward over the growing text
            logits = peft(input_ids=ids).logits[0, -1].float()
            budget.token(token, logits, f"step {step}")
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        out = peft.generate(input_ids=ids[:, :-len(ours)], max_new_tokens=len(ours), do_sample=False)
    assert out.shape[1] == ids.shape[1]  # PEFT's generate runs with this prefix too


def test_a_kv_prompt_from_the_model_s_own_keys_equals_the_input_prompt():
    """--init-model target: the key/value prompt starts as exactly what the input prompt of the
    same init computes, so the two kinds start from the same perplexity."""
    from ctp.lm import token_nlls
    from ctp.prompt.kinds import InputPrompt, initial_prompt

    model = tiny_model("llama")
    embeds = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 0.3
    kv = initial_prompt("kv", embeds, model, model, None)
    ids = ids_of(2, 20, 4)
    with torch.no_grad():
        a = token_nlls(model, ids, InputPrompt(embeds).cache(model))
        b = token_nlls(model, ids, kv.cache(model))
    assert (a - b).abs().max().item() < NLL_ATOL


def test_a_key_value_prompt_refuses_a_model_of_another_shape(kv_prompt, tiny_dir, capfd):
    from ctp.cli import main

    folder, _ = kv_prompt
    opt = tiny_dir("opt")
    capfd.readouterr()
    assert main(["eval", str(opt), "--prompt", str(folder), "--ppl", "embedded",
                 "--max-windows", "1", "--seqlen", "16"]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "key/value shape mismatch" in err[0] and "4 key/value heads" in err[0], err


def test_steps_0_saves_the_initialisation_validated(tmp_path, tiny_dir, tokenizer):
    """The training-free prompt (e.g. IntactKV-style: the dense model's keys and values over a
    text) is a tune-prompt run of 0 steps: saved as it starts, its validation recorded."""
    from ctp import PromptConfig
    from ctp.prompt.tune import tune_prompt

    config = PromptConfig(prompt_type="kv", objective="nll", num_virtual_tokens=3, init="window", steps=0,
                          seqlen=32,
                          batch_size=2, eval_windows=4, device="cpu")
    result = tune_prompt(str(tiny_dir("llama")), config, tmp_path / "p", train_ids=ids_of(1, 2000, 5).flatten(),
                         val_ids=ids_of(1, 600, 6).flatten(), tokenizer=tokenizer, progress=False)
    assert result.meta["steps"] == 0 and result.meta["best_step"] == 0
    assert result.meta["history"]["eval_step"] == [0]


def test_lm_eval_plugin_scores_a_kv_prompt_as_peft_does(kv_prompt, tiny_dir, tokenizer):
    from lm_eval.api.instance import Instance
    from peft import PeftModel

    from ctp.evaluation.lm_eval_plugin import CTPLM
    from ctp.models import load_any

    folder, _ = kv_prompt
    lm = CTPLM(pretrained=str(tiny_dir("llama")), prompt=str(folder), device="cpu", batch_size=2)
    assert lm.ctp_info["prompt_type"] == "kv"
    pairs = [("import numpy", " as np"), ("def add(a, b):", " return a + b")]
    got = [score for score, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    peft = PeftModel.from_pretrained(load_any(str(tiny_dir("llama")), device="cpu"), str(folder)).eval()
    for (context, continuation), score in zip(pairs, got):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        full = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(peft(input_ids=torch.tensor([full])).logits[0].float(), -1)
        want = sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))
        assert score == pytest.approx(want, abs=1e-4)


def test_the_card_of_a_kv_prompt_says_which_kind(kv_prompt):
    from ctp.hub import build_card

    folder, _ = kv_prompt
    card = build_card(folder, "user/kv")
    assert "key/value prompt: a PEFT prefix-tuning adapter" in card and "prefix-tuning" in card
    assert "2 layers x 2 key/value heads x head size 16" in card and "no positions" in card
    assert "drop them before reading logits" not in card


def test_part_rms_steps_move_each_part_of_a_prompt_by_lr_times_its_own_scale(tmp_path, tiny_dir, tokenizer):
    """``--lr-scale part-rms``: each part (input prompt: all of it; key/value prompt: one layer's
    keys, or its values) has its RMS at the start as its scale, computed here by hand from the
    per-layer keys and values; Adam's first step (about lr per value) then moves every value by
    lr times its part's scale; and a run with it trains, records it, and resumes to the bit."""
    from ctp import PromptConfig
    from ctp.prompt.kinds import InputPrompt, KVGeometry, KVPrompt
    from ctp.prompt.state import TrainState
    from ctp.prompt.tune import tune_prompt

    g = torch.Generator().manual_seed(0)
    geometry = KVGeometry(layers=3, kv_heads=2, head_dim=4)
    spread = torch.tensor([0.1, 1.0, 5.0, 0.3, 2.0, 20.0])  # layer 0 keys, values, layer 1 keys, ...
    grid = torch.randn(5, 3, 2, 2, 4, generator=g) * spread.view(1, 3, 2, 1, 1)
    prompt = KVPrompt(grid.reshape(5, -1), geometry)
    keys, values = prompt.keys_values()
    by_hand = torch.stack([torch.stack([k.pow(2).mean().sqrt(), v.pow(2).mean().sqrt()])
                           for k, v in zip(keys, values)])  # [layers, 2]
    scale = prompt.part_rms()
    assert scale.shape == (1, geometry.width)
    torch.testing.assert_close(scale.view(3, 2, 8), by_hand.unsqueeze(-1).expand(3, 2, 8))
    flat = torch.randn(4, 6, generator=g) * 3
    torch.testing.assert_close(InputPrompt(flat).part_rms(), flat.pow(2).mean().sqrt().expand(1, 6))

    config = PromptConfig(lr=0.01, weight_decay=0.0, lr_scale="part-rms")
    state = TrainState.new(prompt.tensor, config, steps=10, warmup=1, settings={}, scale=scale)
    torch.testing.assert_close(state.value().detach(), prompt.tensor)
    weights = 1 + torch.rand(prompt.tensor.shape, generator=g)
    (state.value() * weights).sum().backward()
    state.optimizer.step()
    moved = prompt.tensor - state.value().detach()  # every gradient positive: every value moved down
    torch.testing.assert_close(moved, 0.01 * scale.expand_as(moved), rtol=1e-4, atol=0)

    common = dict(prompt_type="kv", objective="nll", num_virtual_tokens=3, init="window", steps=6, lr=0.05,
                  lr_scale="part-rms", seqlen=32, batch_size=2, eval_every=2, eval_windows=4, device="cpu",
                  save_every=2)
    data = dict(train_ids=ids_of(1, 3000, 3).flatten(), val_ids=ids_of(1, 600, 4).flatten(), tokenizer=tokenizer,
                progress=False)
    model = str(tiny_dir("llama"))
    straight = tune_prompt(model, PromptConfig(**common), tmp_path / "a", **data)
    assert straight.meta["prompt_config"]["lr_scale"] == "part-rms"
    assert len(set(straight.meta["history"]["val_ppl"])) == 4  # the prompt moved at every step
    # interrupted at step 6's validation (the checkpoint of step 4 kept), then resumed: the same prompt
    import ctp.prompt.tune as tune_module

    real, calls = tune_module._validate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # bare, start, steps 2 and 4 done; step 6's
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    tune_module._validate = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            tune_prompt(model, PromptConfig(**common), tmp_path / "b", **data)
    finally:
        tune_module._validate = real
    resumed = tune_prompt(model, PromptConfig(**common), tmp_path / "b", resume=True, **data)
    assert torch.equal(resumed.prompt, straight.prompt)
    assert resumed.meta["history"]["val_ppl"] == straight.meta["history"]["val_ppl"]
