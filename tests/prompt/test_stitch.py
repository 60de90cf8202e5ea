"""Stitching a prompt onto other compressed copies: exact numbers, and the compatibility checks."""

import math
import json
from pathlib import Path

import pytest
import torch

from conftest import calib_ids, tiny_model
from ctp.cli import main
from ctp.compression.pipeline import compress
from ctp.config import CompressConfig, PromptConfig
from ctp.evaluation.perplexity import perplexity_of_ids
from ctp.evaluation.transfer import gap_recovered, transfer
from ctp.artifacts import load_prompt_embeddings
from ctp.prompt.stitch import stitch
from ctp.prompt.tune import tune_prompt


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_dir):
    """A dense tiny base, two differently compressed copies, and a prompt tuned on one."""
    root = tmp_path_factory.mktemp("family")
    base = tiny_dir("llama")
    ids = calib_ids(4, 32)
    a = compress(str(base), CompressConfig(prune="wanda", quant="nf4"), root / "wanda", calibration=ids,
                 progress=False).out
    b = compress(str(base), CompressConfig(prune="magnitude", pattern="2:4", quant="none"), root / "mag",
                 progress=False).out
    text = torch.randint(0, 60, (6000,), generator=torch.Generator().manual_seed(0))
    tune_prompt(str(a), PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=10, lr=0.05, seqlen=32, batch_size=4,
                                     eval_every=5, eval_windows=8),
                root / "prompt", train_ids=text, val_ids=text[:2000], progress=False)
    return {"base": base, "a": str(a), "b": str(b), "prompt": str(root / "prompt"), "root": root}


def test_stitched_perplexity_equals_a_naive_computation_with_the_same_tensor(family):
    result = stitch(family["prompt"], family["b"])
    assert result.warnings == []
    ids = calib_ids(1, 200, seed=9).flatten()
    prompt = load_prompt_embeddings(family["prompt"])
    got = perplexity_of_ids(result.base, ids, 40, prompt=prompt).ppl
    # naive: prepend the tensor by hand, drop virtual positions, score targets 1..L-1
    nlls = []
    for w in range(200 // 40):
        window = ids[w * 40 : (w + 1) * 40].unsqueeze(0)
        with torch.no_grad():
            emb = result.base.get_input_embeddings()(window)
            logits = result.base(inputs_embeds=torch.cat([prompt.unsqueeze(0), emb], 1)).logits[0, 4:]
        logp = torch.log_softmax(logits.double(), -1)
        nlls.append(-logp[torch.arange(39), window[0, 1:]].mean().item())
    # a prompt cache against a prepended prompt: float32 logits in another order agree to ~1e-6
    # (tests/test_lm.py), so the mean NLL does, and the perplexity to rel 1e-5 (as in test_perplexity)
    assert got == pytest.approx(float(torch.tensor(nlls).mean().exp()), rel=1e-5)
    with torch.no_grad():  # the returned PeftModel carries the same prompt
        peft_logits = result.model(input_ids=ids[:40].unsqueeze(0)).logits[0, 4:]
        emb = result.base.get_input_embeddings()(ids[:40].unsqueeze(0))
        ours = result.base(inputs_embeds=torch.cat([prompt.unsqueeze(0), emb], 1)).logits[0, 4:]
    torch.testing.assert_close(peft_logits, ours, rtol=1e-5, atol=1e-5)


def test_transfer_matrix_cells_match_direct_measurements(family):
    result = transfer([family["prompt"]], [family["a"], family["b"]], data="embedded", seqlen=32,
                      max_windows=6, progress=False)
    assert result["dense"]["model"] == str(family["base"])
    assert [m["label"] for m in result["models"]] == ["wanda-50%+nf4-obs", "magnitude-2:4"]
    # every number measured again here, directly, and the recovered share by hand
    from ctp.data import load_text, tokenize
    from ctp.models import load_any, load_tokenizer

    ids = tokenize(load_tokenizer(family["a"]), load_text("embedded", "test"))
    prompt = load_prompt_embeddings(family["prompt"])
    # the very computations transfer() makes (same loads, windows and batch size): rel=1e-9
    dense = perplexity_of_ids(load_any(str(family["base"])), ids, 32, max_windows=6).ppl
    assert result["dense"]["ppl"] == pytest.approx(dense, rel=1e-9)
    for row, folder in zip(range(2), (family["a"], family["b"])):
        model = load_any(folder)
        bare = perplexity_of_ids(model, ids, 32, max_windows=6).ppl
        prompted = perplexity_of_ids(model, ids, 32, prompt=prompt, max_windows=6).ppl
        cell = result["cells"][row][0]
        assert result["models"][row]["ppl"] == pytest.approx(bare, rel=1e-9)
        assert cell["ppl"] == pytest.approx(prompted, rel=1e-9)
        by_hand = (math.log(bare) - math.log(prompted)) / (math.log(bare) - math.log(dense))
        assert cell["recovered"] == pytest.approx(by_hand, rel=1e-9)


def test_transfer_cache_reuses_unchanged_cells_and_redoes_changed_ones(family, tmp_path, monkeypatch):
    import shutil

    import ctp.evaluation.transfer as transfer_module

    prompt = tmp_path / "prompt"
    shutil.copytree(family["prompt"], prompt)
    cache = tmp_path / "cells.jsonl"
    args = dict(data="embedded", seqlen=32, max_windows=4, progress=False)
    first = transfer([str(prompt)], [family["a"], family["b"]], cache=cache, **args)
    assert len(cache.read_text().splitlines()) == 1 + 2 * 2  # dense, and each model bare and prompted

    loads = []
    real_load = transfer_module.load_any
    monkeypatch.setattr(transfer_module, "load_any", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    again = transfer([str(prompt)], [family["a"], family["b"]], cache=cache, **args)
    assert loads == [] and again == first  # every cell read back, no model loaded
    # other settings are other cells
    transfer([str(prompt)], [family["a"]], cache=cache, **{**args, "max_windows": 3})
    assert len(loads) == 2 and len(cache.read_text().splitlines()) == 5 + 3

    # a prompt whose tensor changed is scored again, on every model; the bare cells stay cached
    loads.clear()
    from safetensors.torch import load_file, save_file

    from ctp.artifacts import ADAPTER_WEIGHTS

    tensors = load_file(prompt / ADAPTER_WEIGHTS)
    save_file({k: v * 0.5 for k, v in tensors.items()}, prompt / ADAPTER_WEIGHTS)
    changed = transfer([str(prompt)], [family["a"], family["b"]], cache=cache, **args)
    assert loads == [family["a"], family["b"]]
    assert [r["ppl"] for r in changed["models"]] == [r["ppl"] for r in first["models"]]
    uncached = transfer([str(prompt)], [family["a"], family["b"]], **args)
    assert changed["cells"] == uncached["cells"] and changed["cells"] != first["cells"]
    # a line cut short by an interrupted write is ignored (that cell is simply redone)
    with cache.open("a") as fh:
        fh.write('{"key": "abc", "pp')
    assert transfer([str(prompt)], [family["a"], family["b"]], cache=cache, **args) == uncached


def test_prompts_of_one_label_are_named_by_their_folders(family, tmp_path):
    import shutil

    shutil.copytree(family["prompt"], tmp_path / "lr-0.1")
    result = transfer([family["prompt"], str(tmp_path / "lr-0.1")], [family["a"]], data="embedded", seqlen=32,
                      max_windows=2, progress=False)
    assert [p["label"] for p in result["prompts"]] == ["prompt", "lr-0.1"]
    alone = transfer([family["prompt"]], [family["a"]], data="embedded", seqlen=32, max_windows=2, progress=False)
    assert alone["prompts"][0]["label"].startswith("p4@")  # a unique label stays short


def test_mismatched_hidden_size_and_tokenizer_are_refused(family, tmp_path, capfd, tokenizer):
    import transformers as tf

    wide = tmp_path / "wide"
    cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=256)
    tf.LlamaForCausalLM(cfg).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    capfd.readouterr()
    assert main(["stitch", family["prompt"], str(wide)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hidden size mismatch" in err[0] and "64" in err[0] and "128" in err[0]

    other_tok = tmp_path / "other-tok"
    tiny_model("llama").save_pretrained(other_tok)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(other_tok)
    capfd.readouterr()
    assert main(["stitch", family["prompt"], str(other_tok)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer mismatch" in err[0]


def test_a_different_base_model_is_a_warning(family, tmp_path, capfd, tokenizer):
    other = tmp_path / "other-base"
    tiny_model("llama", seed=123).save_pretrained(other)
    tokenizer.save_pretrained(other)
    capfd.readouterr()
    assert main(["stitch", family["prompt"], str(other), "--json"]) == 0
    captured = capfd.readouterr()
    assert "warning:" in captured.err and "another base" in captured.err
    assert json.loads(captured.out)["warnings"]


def test_save_stitched_pair_loads_with_plain_transformers_and_peft(family, tmp_path, capfd):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pair"
    assert main(["stitch", family["prompt"], family["b"], "--out", str(out), "--ppl", "embedded",
                 "--seqlen", "32", "--max-windows", "4", "--no-progress", "--json"]) == 0
    report = json.loads(capfd.readouterr().out)
    assert set(report["ppl"]) == {"without_prompt", "with_prompt"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "prompt")
    assert model.active_peft_config.num_virtual_tokens == 4
    loaded = model.prompt_encoder["default"].embedding.weight.detach().float()
    assert torch.equal(loaded, load_prompt_embeddings(family["prompt"]))
    assert json.loads((out / "ctp_stitch.json").read_text())["ppl"] == report["ppl"]
    for name in ("config.json", "model.safetensors"):  # the target's own files, byte for byte
        assert (out / name).read_bytes() == (Path(family["b"]) / name).read_bytes()
    assert main(["stitch", family["prompt"], family["b"], "--out", str(out)]) == 2  # no overwrite


def test_stitch_out_needs_a_local_model_folder(family, tmp_path, capfd):
    capfd.readouterr()
    assert main(["stitch", family["prompt"], "no-org/no-model", "--out", str(tmp_path / "o")]) == 2
    assert len(capfd.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_checkpoint_survives_a_crash_between_renames(tmp_path):
    import os

    from ctp.artifacts import find_checkpoint, load_checkpoint, save_checkpoint

    work = tmp_path / "run.work"
    state = {"settings": {}, "step": 4, "history": {}, "best": {}, "optimizer": {}, "scheduler": {}}
    save_checkpoint(work / "checkpoint", {"prompt": torch.ones(2, 3)}, state)
    os.replace(work / "checkpoint", work / "checkpoint.old")  # as if killed mid-save
    found = find_checkpoint(work)
    assert found == work / "checkpoint.old"
    tensors, state = load_checkpoint(found)
    assert state["step"] == 4 and torch.equal(tensors["prompt"], torch.ones(2, 3))


def test_stitch_ppl_loads_the_target_once_and_scores_the_same_windows(family, capfd, monkeypatch):
    """`ctp stitch --ppl`: one model load, and bare and prompted perplexity over the very same
    windows (context less the prompt), each equal to a direct measurement at that length."""
    import ctp.models
    import ctp.prompt.stitch
    from ctp.data import load_text, tokenize
    from ctp.models import load_any, load_tokenizer

    loads = []
    real = ctp.models.load_any

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ctp.prompt.stitch, "load_any", counting)
    monkeypatch.setattr("ctp.evaluation.api.load_any", counting)
    capfd.readouterr()
    assert main(["stitch", family["prompt"], family["b"], "--ppl", "embedded", "--max-windows", "3",
                 "--json", "--no-progress"]) == 0
    report = json.loads(capfd.readouterr().out)
    assert loads == [family["b"]]
    assert report["seqlen"] == {"embedded": 256 - 4}  # the tiny models' context less the prompt
    ids = tokenize(load_tokenizer(family["b"]), load_text("embedded", "test"))
    model = load_any(family["b"])
    bare = perplexity_of_ids(model, ids, 252, max_windows=3).ppl
    prompted = perplexity_of_ids(model, ids, 252, prompt=load_prompt_embeddings(family["prompt"]),
                                 max_windows=3).ppl
    assert report["ppl"]["without_prompt"]["embedded"] == pytest.approx(bare, rel=1e-9)
    assert report["ppl"]["with_prompt"]["embedded"] == pytest.approx(prompted, rel=1e-9)


@pytest.mark.parametrize("meta, label", [
    ({"prompt_type": "kv", "objective": "kd", "steps": 300}, "kv10-kd@wanda-50%+nf4"),
    ({"prompt_type": "kv", "objective": "kd", "steps": 0}, "kv10-start@wanda-50%+nf4"),
    ({"prompt_type": "input", "objective": "nll", "steps": 5}, "p10@wanda-50%+nf4"),
    ({}, "p10@wanda-50%+nf4"),  # an older folder: an input prompt, next-token loss
])
def test_a_prompt_label_says_what_shaped_it(tmp_path, meta, label):
    """A 0-step prompt is its start whatever objective its config names: labelled ``-start``."""
    from ctp.evaluation.transfer import prompt_label

    record = {"num_virtual_tokens": 10, "hidden_size": 8, "tokenizer_fingerprint": None,
              "base_fingerprint": None, "prompt_config": {}, "best_val_ppl": 1.0,
              "compression_label": "wanda-50%+nf4", "kv_layers": 2, "kv_heads": 1, "head_dim": 4, **meta}
    (tmp_path / "ctp_prompt.json").write_text(json.dumps(record))
    assert prompt_label(str(tmp_path)) == label
