"""Prompt tuning: learning, the PEFT artifact, exact resume after SIGKILL, data parallelism."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_model
from ctp.config import PromptConfig
from ctp.lm import token_nlls
from ctp.artifacts import load_prompt_embeddings, read_prompt_meta
from ctp.prompt.tune import tune_prompt


def ids_of(n, seed=0, vocab=50):
    # a low-entropy stream (small vocabulary) that a prompt can visibly help with
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_training_loss_falls_and_best_prompt_is_kept(tmp_path):
    model = tiny_model("llama")
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=40, lr=0.05, seqlen=32, batch_size=4,
                          eval_every=10, eval_windows=8, warmup_steps=0)
    result = tune_prompt(model, config, tmp_path / "p", train_ids=ids_of(4000), val_ids=ids_of(800, 1),
                         progress=False)
    h = result.meta["history"]
    assert sum(h["train_loss"][-5:]) / 5 < sum(h["train_loss"][:5]) / 5 - 0.05
    assert h["eval_step"] == [0, 10, 20, 30, 40]
    best = min(h["val_ppl"])
    assert result.meta["best_val_ppl"] == best < result.meta["val_ppl_without_prompt"]
    assert result.meta["best_step"] == h["eval_step"][h["val_ppl"].index(best)]
    assert torch.equal(load_prompt_embeddings(tmp_path / "p"), result.prompt)
    assert (tmp_path / "p" / "training_curve.png").stat().st_size > 1000
    assert not (tmp_path / "p.work").exists()


def test_the_prompt_kept_is_the_best_by_validation_not_the_last(tmp_path):
    """Training text from one token range, validation from another: the prompt fits the first
    and validation gets worse, so the best checkpoint is an early one. What is saved must be that
    one (re-measured here), and the no-prompt baseline must be the model alone."""
    from ctp.evaluation.perplexity import perplexity_of_ids
    from ctp.lm import spread_windows

    model = tiny_model("llama")
    train = ids_of(4000)  # tokens 0..49
    val = ids_of(800, 1) + 100  # tokens 100..149
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=30, lr=0.1, schedule="constant", seqlen=32,
                          batch_size=4, eval_every=5, eval_windows=8, warmup_steps=0)
    result = tune_prompt(model, config, tmp_path / "p", train_ids=train, val_ids=val, progress=False)
    h = result.meta["history"]
    assert result.meta["best_step"] < 30 and h["val_ppl"][-1] > result.meta["best_val_ppl"]
    windows = spread_windows(val, 32, 8).flatten()
    saved = load_prompt_embeddings(tmp_path / "p")
    # validation's own batch size: the very computation it made, so equal up to the last digits
    measure = lambda **kw: perplexity_of_ids(model, windows, 32, batch_size=config.batch_size, **kw).ppl
    assert measure(prompt=saved) == pytest.approx(result.meta["best_val_ppl"], rel=1e-9)
    assert result.meta["val_ppl_without_prompt"] == pytest.approx(measure(), rel=1e-9)


def test_prompt_folder_is_a_peft_adapter_that_scores_like_ctp(tmp_path):
    from peft import PeftModel

    model = tiny_model("qwen2")
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=5, steps=3, lr=0.05, seqlen=32, batch_size=2,
                          eval_every=3, eval_windows=4)
    result = tune_prompt(model, config, tmp_path / "p", train_ids=ids_of(2000), val_ids=ids_of(400, 1),
                         progress=False)
    adapter = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 5
    assert adapter["token_dim"] == 64
    assert list(load_file(str(tmp_path / "p" / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    meta = read_prompt_meta(tmp_path / "p")
    assert meta["hidden_size"] == 64 and meta["num_virtual_tokens"] == 5
    peft_model = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path / "p").eval()
    batch = ids_of(64, 7).view(2, 32)
    with torch.no_grad():
        logits = peft_model(input_ids=batch).logits[:, 5:]  # PEFT returns virtual positions too
        peft_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
            reduction="none").view(2, -1)
        ours = token_nlls(model, batch, result.prompt)
    torch.testing.assert_close(ours, peft_nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["vocab", "sample-vocab", "random", "text:the model"])
def test_initialisations(init, tokenizer):
    from ctp.prompt.state import init_prompt

    embed = torch.randn(2048, 8)
    prompt = init_prompt(PromptConfig(num_virtual_tokens=6, init=init), embed, tokenizer)
    assert prompt.shape == (6, 8)
    again = init_prompt(PromptConfig(num_virtual_tokens=6, init=init), embed, tokenizer)
    assert torch.equal(prompt, again)  # seeded
    if init == "vocab":
        assert torch.equal(prompt, embed[:6])
    if init == "sample-vocab":
        rows = [int(((embed - row).abs().sum(1) == 0).nonzero()[0]) for row in prompt]
        assert len(set(rows)) > 1 and all(torch.equal(prompt[i], embed[r]) for i, r in enumerate(rows))
    if init == "random":
        assert abs(prompt.std().item() - embed.std().item()) < 0.3 * embed.std().item()
        assert not any(((embed - row).abs().sum(1) == 0).any() for row in prompt)
    if init == "text:the model":
        ids = tokenizer("the model", add_special_tokens=False)["input_ids"]
        assert all(torch.equal(prompt[i], embed[ids[i % len(ids)]]) for i in range(6))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from ctp.data import embedded_corpus_dir

    folder = tmp_path_factory.mktemp("texts")
    corpus = embedded_corpus_dir()
    (folder / "train.txt").write_text((corpus / "train.txt").read_text()[:200_000])
    (folder / "val.txt").write_text((corpus / "validation.txt").read_text()[:40_000])
    return folder


def tune_args(model_dir, out, texts, *extra):
    return ["tune-prompt", str(model_dir), "--out", str(out), "--prompt-type", "input", "--objective", "nll",
            "--data", str(texts / "train.txt"), "--val-data", str(texts / "val.txt"), "--num-virtual-tokens", "4", "--seqlen", "32",
            "--batch-size", "4", "--lr", "0.01", "--no-progress", *extra]


def test_resume_after_sigkill_ends_with_the_same_prompt(tmp_path, tiny_dir, texts):
    model_dir = tiny_dir("llama")
    common = ["--steps", "150", "--save-every", "10", "--eval-every", "1", "--eval-windows", "24"]
    straight = run_cli(*tune_args(model_dir, tmp_path / "a", texts, *common))
    assert straight.returncode == 0, straight.stderr

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ctp.cli", *tune_args(model_dir, tmp_path / "b", texts, *common)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "b.work" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 40:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b").exists()

    refused = run_cli(*tune_args(model_dir, tmp_path / "b", texts, *common))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_cli(*tune_args(model_dir, tmp_path / "b", texts, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    # the same computation, interrupted: equal to the bit (both runs single-threaded)
    assert torch.equal(load_prompt_embeddings(tmp_path / "a"), load_prompt_embeddings(tmp_path / "b"))
    meta_a, meta_b = read_prompt_meta(tmp_path / "a"), read_prompt_meta(tmp_path / "b")
    for key in ("train_loss", "val_ppl", "eval_step"):
        assert meta_a["history"][key] == meta_b["history"][key], key
    assert meta_a["best_step"] == meta_b["best_step"]
    assert not (tmp_path / "b.work").exists()


def test_two_processes_give_the_loss_curve_of_one(tmp_path, tiny_dir, texts):
    model_dir = tiny_dir("llama")
    common = ["--steps", "6", "--eval-every", "3", "--eval-windows", "8", "--json"]
    one = run_cli(*tune_args(model_dir, tmp_path / "one", texts, *common))
    assert one.returncode == 0, one.stderr
    args = tune_args(model_dir, tmp_path / "two", texts, *common)
    args[args.index("--batch-size") + 1] = "2"  # same global batch of 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "-m", "ctp.cli", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    meta_one, meta_two = read_prompt_meta(tmp_path / "one"), read_prompt_meta(tmp_path / "two")
    assert meta_two["processes"] == 2 and meta_two["global_batch"] == meta_one["global_batch"] == 4
    # two correct computations: batches of 2 in two processes, gradients averaged by an
    # all-reduce, against batches of 4 in one; float32 rounding in another order, carried through
    # 6 Adam steps (lr 0.01), moves losses of ~7.6 by ~1e-6: 1e-4 allows that, not a lost window
    assert meta_two["history"]["train_loss"] == pytest.approx(meta_one["history"]["train_loss"], abs=1e-4)
    assert meta_two["history"]["val_ppl"] == pytest.approx(meta_one["history"]["val_ppl"], rel=1e-4)


def test_bad_inputs(tmp_path, tiny_dir, texts, capfd):
    from ctp.cli import main

    model_dir = tiny_dir("llama")  # context 256
    (tmp_path / "tiny_val.txt").write_text("too short")
    exists = tmp_path / "exists"
    exists.mkdir()
    capfd.readouterr()
    out = tmp_path / "p"
    cases = [
        (tune_args(model_dir, exists, texts), "already exists"),
        (tune_args(tmp_path / "nomodel", out, texts), "not found"),
        (tune_args(model_dir, out, texts, "--num-virtual-tokens", "0"), "num_virtual_tokens must be positive"),
        (tune_args(model_dir, out, texts, "--num-virtual-tokens", "300"), "below the model's context"),
        (tune_args(model_dir, out, texts, "--seqlen", "250", "--num-virtual-tokens", "10"), "exceeds the model's context"),
        (tune_args(model_dir, out, texts, "--lr", "0"), "lr must be positive"),
        (tune_args(model_dir, out, texts, "--steps", "-1"), "steps must not be negative"),
        (tune_args(model_dir, out, texts, "--resume"), "no checkpoint to resume"),
        (["tune-prompt", str(model_dir), "--out", str(out), "--data", str(texts / "train.txt"),
          "--val-data", str(tmp_path / "tiny_val.txt"), "--seqlen", "32", "--num-virtual-tokens", "4"],
         "validation split is empty"),
        (["tune-prompt", str(model_dir), "--out", str(out), "--data", str(texts / "train.txt")],
         "--val-data"),
    ]
    for args, message in cases:
        code = main(args)
        err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
        assert not out.exists() and not (tmp_path / "p.work").exists()
    assert list(exists.iterdir()) == []


def test_damaged_weights_are_refused_before_the_text_is_tokenized(tmp_path, tiny_dir, texts, monkeypatch):
    import shutil

    from ctp.errors import CTPError
    from ctp.prompt import tune

    def tokenized(*args, **kwargs):
        raise AssertionError("the training text was tokenized before the weights were checked")

    monkeypatch.setattr(tune, "_prepare_data", tokenized)
    good, bad = tiny_dir("llama"), tmp_path / "bad"
    shutil.copytree(good, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    config = PromptConfig(data=str(texts / "train.txt"), val_data=str(texts / "val.txt"), steps=1, seqlen=32)
    for models in (str(bad), [str(good), str(bad)]):  # alone, or any of several targets
        with pytest.raises(CTPError, match="model.safetensors is damaged"):
            tune_prompt(models, config, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.work").exists()


def test_resume_with_different_settings_is_refused(tmp_path, tiny_dir, texts, capfd, monkeypatch):
    """A run interrupted after its first checkpoint resumes only with its own settings, and then
    ends exactly where an uninterrupted run ends."""
    from ctp.cli import main
    from ctp.prompt.state import TrainState

    model_dir = tiny_dir("llama")
    common = ["--steps", "6", "--save-every", "2", "--eval-every", "3"]
    assert main(tune_args(model_dir, tmp_path / "straight", texts, *common)) == 0

    save = TrainState.save

    def save_then_die(self, folder):
        save(self, folder)
        raise KeyboardInterrupt  # as if killed right after the first checkpoint

    monkeypatch.setattr(TrainState, "save", save_then_die)
    assert main(tune_args(model_dir, tmp_path / "p", texts, *common)) == 130
    monkeypatch.setattr(TrainState, "save", save)
    assert (tmp_path / "p.work" / "checkpoint").is_dir() and not (tmp_path / "p").exists()
    capfd.readouterr()
    for changed in (["--lr", "0.02"], ["--seed", "1"], ["--num-virtual-tokens", "5"]):
        code = main(tune_args(model_dir, tmp_path / "p", texts, *common, *changed, "--resume"))
        err = capfd.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "different settings" in err[0], (changed, err)
        assert not (tmp_path / "p").exists()
    from ctp.prompt.objective import Objective

    steps_run = []
    real = Objective.loss
    monkeypatch.setattr(Objective, "loss", lambda self, *a, **k: steps_run.append(1) or real(self, *a, **k))
    assert main(tune_args(model_dir, tmp_path / "p", texts, *common, "--resume")) == 0
    assert len(steps_run) == 6 - 2  # it went on from step 2: no step was trained twice
    straight, resumed = read_prompt_meta(tmp_path / "straight"), read_prompt_meta(tmp_path / "p")
    for key in ("step", "eval_step", "val_ppl_without_prompt"):  # the step-0 record came from the checkpoint
        assert resumed["history"][key] == straight["history"][key], key
    for key in ("train_loss", "val_ppl"):  # the same computation, resumed: equal to the bit
        assert resumed["history"][key] == straight["history"][key], key
    assert torch.equal(load_prompt_embeddings(tmp_path / "p"), load_prompt_embeddings(tmp_path / "straight"))


def test_eval_with_prompt_folder_matches_the_api(tmp_path, tiny_dir, texts, capfd):
    from ctp.cli import main
    from ctp.data import load_text, tokenize
    from ctp.evaluation.perplexity import perplexity_of_ids
    from ctp.models import load_any, load_tokenizer

    model_dir = tiny_dir("llama")
    assert main(tune_args(model_dir, tmp_path / "p", texts, "--steps", "3", "--eval-every", "3",
                          "--eval-windows", "4")) == 0
    capfd.readouterr()
    assert main(["eval", str(model_dir), "--prompt", str(tmp_path / "p"), "--ppl",
                 str(texts / "val.txt"), "--seqlen", "32", "--max-windows", "10", "--json",
                 "--no-progress"]) == 0
    reported = json.loads(capfd.readouterr().out)
    assert reported["details"]["val.txt"]["virtual_tokens"] == 4
    model = load_any(str(model_dir))
    ids = tokenize(load_tokenizer(str(model_dir)), load_text(str(texts / "val.txt")))
    expected = perplexity_of_ids(model, ids, 32, prompt=load_prompt_embeddings(tmp_path / "p"),
                                 max_windows=10)
    assert reported["ppl"]["val.txt"] == pytest.approx(expected.ppl, rel=1e-9)
