"""Distillation and several targets: the losses against hand computations, the teacher found from
the target's metadata, one prompt trained on several compressed copies of one base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import calib_ids, tiny_model


def ids_of(batch, length, seed=0):
    return torch.randint(3, 2048, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_kd_loss_is_the_kl_from_the_teacher_at_the_scored_positions():
    """KL(teacher || student) per scored token, mean over tokens; the teacher reads the windows
    without the prompt; gradients reach the prompt; nll+kd mixes the two by the weight."""
    from ctp.prompt.kinds import InputPrompt
    from ctp.prompt.objective import Objective, Teacher

    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    for m in (student, teacher):
        for p in m.parameters():
            p.requires_grad_(False)
    ids = ids_of(2, 16, 1)
    prompt = torch.nn.Parameter(torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 0.3)
    kd = Objective("kd", teacher=Teacher(teacher, None, "t"))
    loss = kd.loss(student, ids, InputPrompt(prompt).cache(student))
    loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    with torch.no_grad():
        full = torch.cat([prompt.unsqueeze(0).expand(2, -1, -1), student.get_input_embeddings()(ids)], 1)
        s = F.log_softmax(student(inputs_embeds=full).logits[:, 3:-1].float(), -1)
        t = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
        want_kl = (t.exp() * (t - s)).sum(-1).mean()
        want_nll = F.nll_loss(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(want_kl.item(), rel=1e-5)
    mixed = Objective("nll+kd", kd_weight=0.25, teacher=Teacher(teacher, None, "t"))
    with torch.no_grad():
        got = mixed.loss(student, ids, InputPrompt(prompt).cache(student)).item()
    assert got == pytest.approx(0.75 * want_nll.item() + 0.25 * want_kl.item(), rel=1e-5)
    with torch.no_grad():  # a student that is the teacher has nothing to learn
        assert Objective("kd", teacher=Teacher(student, None, "s")).loss(student, ids, None).item() < 1e-5


def test_kd_tune_prompt_finds_the_dense_base_and_records_it(tmp_path, tiny_dir, tokenizer, capsys):
    """The default teacher is the dense base named in the target's ctp_compression.json;
    --teacher names another; a target with no known base is refused in one line."""
    from ctp import CompressConfig, PromptConfig
    from ctp.cli import main
    from ctp.compression.pipeline import compress
    from ctp.prompt.tune import tune_prompt

    base = str(tiny_dir("llama"))
    compress(base, CompressConfig(prune="wanda", quant="nf4", rounding="rtn", device="cpu"), tmp_path / "c",
             calibration=calib_ids(4, 32), progress=False)
    config = PromptConfig(objective="kd", prompt_type="kv", num_virtual_tokens=3, steps=2, lr=0.01, seqlen=32,
                          batch_size=2, eval_every=2, eval_windows=4, device="cpu")
    result = tune_prompt(str(tmp_path / "c"), config, tmp_path / "p", train_ids=ids_of(1, 2000, 3).flatten(),
                         val_ids=ids_of(1, 500, 4).flatten(), tokenizer=tokenizer, progress=False)
    assert result.meta["teacher"] == base and result.meta["objective"] == "kd"
    # a compressed model whose base is unknown (no ctp_compression.json) needs --teacher
    (tmp_path / "c" / "ctp_compression.json").unlink()
    texts = tmp_path / "t.txt"
    texts.write_text("a b c d e f g " * 400)
    args = ["tune-prompt", str(tmp_path / "c"), "--out", str(tmp_path / "q"), "--objective", "kd", "--data",
            str(texts), "--val-data", str(texts), "--steps", "1", "--seqlen", "16", "--num-virtual-tokens", "2",
            "--no-progress"]
    assert main(args) == 2
    assert main([*args, "--teacher", base]) == 0
    assert json.loads((tmp_path / "q" / "ctp_prompt.json").read_text())["teacher"] == base
    # the defaults (a kv prompt, distillation) on the dense model itself: refused, one line naming
    # the way out; the paper's setting trains
    dense = [a if a != str(tmp_path / "c") else base for a in args if a not in ("--objective", "kd")]
    capsys.readouterr()
    assert main([*dense, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dense model itself" in err[0] and "--objective nll" in err[0]
    assert main([*dense, "--overwrite", "--objective", "nll"]) == 0
    meta = json.loads((tmp_path / "q" / "ctp_prompt.json").read_text())
    assert (meta["prompt_type"], meta["objective"], meta["prompt_config"]["init"]) == ("kv", "nll", "window")


def test_one_prompt_on_several_targets(tmp_path, tiny_dir, tokenizer, monkeypatch):
    """--targets: each micro-batch's windows split evenly among the copies (every copy sees its
    share every step), validation the exp of the mean of their mean NLLs; copies of another base
    or a batch that does not split are refused."""
    from ctp import CompressConfig, PromptConfig
    from ctp.compression.pipeline import compress
    from ctp.evaluation.perplexity import perplexity_of_ids
    from ctp.lm import spread_windows
    from ctp.models import load_any
    from ctp.prompt.objective import Objective
    from ctp.prompt.tune import tune_prompt
    from ctp.errors import CTPError

    base = str(tiny_dir("llama"))
    copies = []
    for name, cfg in (("w", dict(prune="wanda")), ("m", dict(prune="magnitude"))):
        compress(base, CompressConfig(quant="nf4", rounding="rtn", device="cpu", **cfg), tmp_path / name,
                 calibration=calib_ids(4, 32), progress=False)
        copies.append(str(tmp_path / name))
    seen = []
    real = Objective.loss
    monkeypatch.setattr(Objective, "loss", lambda self, model, batch, ctx: seen.append(
        (id(model), batch.shape[0])) or real(self, model, batch, ctx))
    train, val = ids_of(1, 3000, 5).flatten(), ids_of(1, 600, 6).flatten()
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=3, steps=2, lr=0.01, seqlen=32, batch_size=4, eval_every=2,
                          eval_windows=4, device="cpu")
    result = tune_prompt(copies, config, tmp_path / "p", train_ids=train, val_ids=val, tokenizer=tokenizer,
                         progress=False)
    assert len(seen) == 4 and len({m for m, _ in seen}) == 2 and {b for _, b in seen} == {2}
    meta = json.loads((tmp_path / "p" / "ctp_prompt.json").read_text())
    assert [t["model"] for t in meta["targets"]] == copies and " & " in meta["compression_label"]
    windows = spread_windows(val, 32, 4)
    nlls = [perplexity_of_ids(load_any(c, device="cpu"), windows.flatten(), 32, result.prompt).nll for c in copies]
    assert meta["best_val_ppl"] == pytest.approx(torch.tensor(nlls).mean().exp().item(), rel=1e-6)
    with pytest.raises(CTPError, match="multiple of the number of targets"):
        tune_prompt(copies, PromptConfig(**{**config.__dict__, "batch_size": 3}), train_ids=train, val_ids=val,
                    tokenizer=tokenizer, progress=False)
    with pytest.raises(CTPError, match="not compressed copies of one base"):
        tune_prompt([copies[0], str(tiny_dir("qwen2"))], config, train_ids=train, val_ids=val,
                    tokenizer=tokenizer, progress=False)


def test_kl_chunk_loss_and_gradient_equal_autograd_through_the_textbook_formula():
    """The chunked KL (value and its gradient to the hidden states, through a soft-capped head)
    against autograd through ``sum p_t (log p_t - log_softmax(student))`` written out here."""
    from ctp.head import Head, kl_fn, per_token_losses

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 300, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(300, 16, generator=g))
    head = Head(linear, softcap=5.0)
    hidden = (torch.randn(37, 16, generator=g) * 0.7).requires_grad_(True)
    taught = torch.randn(37, 16, generator=g) * 0.7
    weights = torch.rand(37, generator=g)
    got = per_token_losses(hidden, kl_fn(head, head, taught), chunk=8)
    (got * weights).sum().backward()
    grad, hidden.grad = hidden.grad.clone(), None

    h = hidden.detach().double().requires_grad_(True)
    w = linear.weight.double()
    s = torch.log_softmax(torch.tanh(h @ w.T / 5.0) * 5.0, -1)
    t = torch.log_softmax(torch.tanh(taught.double() @ w.T / 5.0) * 5.0, -1)
    want = (t.exp() * (t - s)).sum(-1)
    (want * weights.double()).sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), h.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # without gradients: the same values, nothing kept for a backward pass
        torch.testing.assert_close(per_token_losses(hidden.detach(), kl_fn(head, head, taught), 8), got.detach())


def test_teacher_cache_serves_a_second_run_without_running_the_teacher(tmp_path, tiny_dir, tokenizer, monkeypatch):
    """--teacher-cache: the first kd run writes one entry per training window it reads; a second
    run on the same windows reads every batch (the teacher's layers never run: hidden_states is
    called for the student only) and learns the same prompt; a damaged entry is recomputed; the
    folder is not part of a run's identity (resume, recipes)."""
    from ctp import CompressConfig, PromptConfig
    from ctp.compression.pipeline import compress
    from ctp.prompt import objective as objective_module
    from ctp.prompt.state import run_settings
    from ctp.prompt.tune import tune_prompt

    base = str(tiny_dir("llama"))
    compress(base, CompressConfig(prune="wanda", quant="nf4", rounding="rtn", device="cpu"), tmp_path / "c",
             calibration=calib_ids(4, 32), progress=False)
    cache = tmp_path / "cache"
    config = PromptConfig(objective="kd", prompt_type="kv", num_virtual_tokens=3, steps=3, lr=0.05, seqlen=32,
                          batch_size=2, eval_every=3, eval_windows=4, device="cpu", teacher_cache=str(cache))
    data = dict(train_ids=ids_of(1, 3000, 7).flatten(), val_ids=ids_of(1, 600, 8).flatten(), tokenizer=tokenizer,
                progress=False)
    plain = tune_prompt(str(tmp_path / "c"), PromptConfig(**{**config.__dict__, "teacher_cache": None}), **data)
    first = tune_prompt(str(tmp_path / "c"), config, **data)
    assert first.meta["teacher_cache_batches"] == {"read": 0, "computed": 3}
    entries = sorted(cache.glob("*/*.safetensors"))
    assert len(entries) == 3 * 2 and len(list(cache.glob("*/teacher.json"))) == 1
    assert torch.equal(first.prompt, plain.prompt)  # computing and writing changes nothing

    calls = []
    real = objective_module.hidden_states
    monkeypatch.setattr(objective_module, "hidden_states", lambda model, *a: calls.append(model) or real(model, *a))
    second = tune_prompt(str(tmp_path / "c"), config, **data)
    assert second.meta["teacher_cache_batches"] == {"read": 3, "computed": 0}
    assert len(calls) == 3 and all(m is calls[0] for m in calls)  # the student, once a step
    torch.testing.assert_close(second.prompt, first.prompt, rtol=1e-5, atol=1e-6)
    entries[0].write_bytes(b"damaged")
    third = tune_prompt(str(tmp_path / "c"), config, **data)
    assert third.meta["teacher_cache_batches"]["computed"] == 1
    assert run_settings(config) == run_settings(PromptConfig(**{**config.__dict__, "teacher_cache": "elsewhere"}))
