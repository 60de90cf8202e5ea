"""``ctp generate`` / ``ctp.generate``: greedy output equals the prepended prompt's, text streams
as it is decoded, one prompt cache serves every input, sampling is seeded, bad input is one line."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_model
from ctp.artifacts import load_prompt_embeddings, write_prompt_folder
from ctp.cli import main
from ctp.errors import CTPError
from ctp.generation import GenerateConfig, generate, load_generator
from ctp.models import load_any, load_tokenizer, tokenizer_fingerprint
from ctp.prompt.stitch import save_stitched
from ties import GREEDY_ATOL, GREEDY_FLIPS, TieBudget

INPUTS = ["import numpy as", "Colours: red, orange,", "def add(a, b):\n    return"]


def write_prompt(folder, tokenizer, hidden=64, n=5, seed=3):
    prompt = torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)) * 0.5
    meta = {"num_virtual_tokens": n, "hidden_size": hidden, "base_fingerprint": None, "prompt_config": {},
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "best_val_ppl": 1.0}
    folder.mkdir(parents=True)
    write_prompt_folder(folder, prompt, "tiny", 2, 4, meta)
    return str(folder)


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_dir, tokenizer):
    """A tiny llama folder, a prompt folder for it, and the two stitched into a pair folder."""
    root = tmp_path_factory.mktemp("generate")
    model, prompt = str(tiny_dir("llama")), write_prompt(root / "prompt", tokenizer)
    pair = save_stitched(prompt, model, root / "pair")
    return {"model": model, "prompt": prompt, "pair": str(pair), "root": root}


def naive_greedy(model, prompt, ids, steps, eos, follow=None, ties=None):
    """Greedy tokens by full forward passes over [prompt embeddings, ids, new], no cache.

    ``follow`` is a :class:`Generation` under test: each of its tokens (and its EOS, when it
    stopped at one) is checked by ``ties`` to be the argmax here or a near-tie with it, then
    taken, so that the next step is compared on the same text."""
    new = []
    for t in range(steps):
        with torch.no_grad():
            emb = model.get_input_embeddings()(torch.tensor([ids + new]))
            if prompt is not None:
                emb = torch.cat([prompt[None], emb], 1)
            logits = model(inputs_embeds=emb).logits[0, -1]
        if follow is not None and t < len(follow.token_ids):
            token = ties.token(follow.token_ids[t], logits, f"input {follow.index} step {t}")
        elif follow is not None and follow.stop == "eos":  # it stopped here: at its likeliest EOS
            token = ties.token(max(eos, key=lambda e: float(logits[e])), logits, f"input {follow.index} EOS")
        else:
            token = int(logits.argmax())
        if token in eos:
            break
        new.append(token)
    return new


def test_greedy_output_equals_the_prepended_prompt_and_streams_as_it_is_decoded(made):
    gen = load_generator(made["model"], made["prompt"], GenerateConfig(max_new_tokens=10, compare=True))
    pieces = list(gen.stream(INPUTS))
    done = [p.done for p in pieces if p.done]
    assert [(g.index, g.with_prompt) for g in done] == [(0, True), (0, False), (1, True), (1, False),
                                                          (2, True), (2, False)]
    model, tok = load_any(made["model"]), load_tokenizer(made["model"])
    prompt = load_prompt_embeddings(made["prompt"])
    ties = TieBudget(GREEDY_FLIPS, atol=GREEDY_ATOL, what="greedy")
    for g in done:
        ids = tok(g.input)["input_ids"]
        assert g.token_ids == naive_greedy(model, prompt if g.with_prompt else None, ids, 10, gen.eos_ids,
                                           follow=g, ties=ties)
        streamed = [p for p in pieces if (p.index, p.with_prompt) == (g.index, g.with_prompt)]
        assert "".join(p.text for p in streamed) == g.text == tok.decode(g.token_ids, skip_special_tokens=True)
        assert len(streamed) > len(g.token_ids) // 2  # text arrives token by token, not at the end
    assert any(a.token_ids != b.token_ids for a, b in zip(done[::2], done[1::2]))  # the prompt matters


def test_one_prompt_cache_serves_every_input(made, monkeypatch):
    embeds = []
    model, tok = tiny_model("llama"), load_tokenizer(made["model"])
    model.register_forward_pre_hook(lambda m, a, kw: embeds.append("inputs_embeds" in kw), with_kwargs=True)
    prompt = load_prompt_embeddings(made["prompt"])
    result = generate(model, INPUTS, prompt, GenerateConfig(max_new_tokens=4, compare=True), tokenizer=tok)
    assert len(result["outputs"]) == 6
    assert embeds.count(True) == 1  # the prompt's embeddings went through the model once: one cache
    assert result["num_virtual_tokens"] == 5 and result["prompt_cache_bytes"] == 5 * 2 * 2 * 2 * 16 * 4


def test_a_stitched_pair_folder_brings_its_prompt(made):
    config = GenerateConfig(max_new_tokens=6)
    pair = generate(made["pair"], INPUTS[:2], config=config)
    assert pair["num_virtual_tokens"] == 5 and pair["prompt"].endswith("prompt")
    separate = generate(made["model"], INPUTS[:2], made["prompt"], config)
    assert [o["token_ids"] for o in pair["outputs"]] == [o["token_ids"] for o in separate["outputs"]]
    bare = generate(made["model"], INPUTS[:2], config=config)
    assert bare["num_virtual_tokens"] == 0 and bare["outputs"] != separate["outputs"]


def test_sampling_is_reproducible_and_compare_uses_the_same_seed(made):
    gen = load_generator(made["model"], made["prompt"])
    config = GenerateConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=3, compare=True)
    first = [g.token_ids for g in gen.generate(INPUTS[:2], config)]
    assert first == [g.token_ids for g in gen.generate(INPUTS[:2], config)]
    assert first[0] == [g.token_ids for g in gen.generate(INPUTS[:1], config)][0]  # input by input
    other = GenerateConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=4, compare=True)
    assert first != [g.token_ids for g in gen.generate(INPUTS[:2], other)]
    bare = load_generator(made["model"]).generate(INPUTS[:2], GenerateConfig(max_new_tokens=8, temperature=1.0,
                                                                             top_p=0.95, seed=3))
    assert [first[1], first[3]] == [g.token_ids for g in bare]


class Recorder(io.StringIO):
    """stdout that records each flush, to see text leave while decoding goes on."""

    def __init__(self):
        super().__init__()
        self.flushed = []

    def flush(self):
        self.flushed.append(self.getvalue())


def test_cli_streams_to_stdout_and_labels_on_stderr(made, monkeypatch, capsys):
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{INPUTS[0]}\n\n{INPUTS[1]}\n"))
    assert main(["generate", made["pair"], "--max-new-tokens", "6", "--compare"]) == 0
    err = capsys.readouterr().err
    assert err.count("--- input") == 4 and "with prompt" in err and "without prompt" in err
    assert "prompt of 5 virtual tokens cached once" in err
    lines = out.getvalue().split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # 2 inputs x 2 variants, one line each
    assert len(set(out.flushed)) > 8  # flushed piece by piece
    expected = generate(made["pair"], INPUTS[:2], config=GenerateConfig(max_new_tokens=6, compare=True))
    assert lines[:4] == [o["text"] for o in expected["outputs"]]


def test_cli_json_and_what_it_passes_to_the_api(made, monkeypatch, capsys):
    import ctp.generation

    seen = {}
    real = ctp.generation.load_generator

    def spy(model, prompt, config):
        seen.update(model=model, prompt=prompt, config=config)
        return real(model, prompt, config)

    monkeypatch.setattr(ctp.generation, "load_generator", spy)
    assert main(["generate", made["model"], "--prompt", made["prompt"], "--text", "x = ", "--text", "y",
                 "--max-new-tokens", "3", "--temperature", "0.7", "--top-p", "0.5", "--seed", "9",
                 "--device", "cpu", "--json"]) == 0
    assert seen["model"] == made["model"] and seen["prompt"] == made["prompt"]
    assert seen["config"] == GenerateConfig(max_new_tokens=3, temperature=0.7, top_p=0.5, seed=9, device="cpu")
    report = json.loads(capsys.readouterr().out)
    assert [o["input"] for o in report["outputs"]] == ["x = ", "y"] and report["num_virtual_tokens"] == 5


def test_bad_input_is_one_line_on_stderr_and_exit_2(made, tmp_path, tokenizer, monkeypatch, capfd):
    wide = write_prompt(tmp_path / "wide", tokenizer, hidden=32)
    other_tok = write_prompt(tmp_path / "other-tok", tokenizer)
    meta_path = tmp_path / "other-tok" / "ctp_prompt.json"
    meta_path.write_text(meta_path.read_text().replace(tokenizer_fingerprint(tokenizer), "0123456789abcdef"))
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    cases = [
        (["--prompt", wide, "--text", "a"], "hidden size mismatch"),
        (["--prompt", other_tok, "--text", "a"], "tokenizer mismatch"),
        (["--prompt", made["prompt"], "--text", "a b c", "--max-new-tokens", "250"], "context of 256"),
        (["--text", ""], "input 1 is empty"),
        ([], "empty input"),  # blank lines on stdin
        (["--text", "a", "--compare"], "compare needs a prompt"),
        (["--text", "a", "--top-p", "0"], "top_p must be in (0, 1]"),
    ]
    capfd.readouterr()
    for args, message in cases:
        assert main(["generate", made["model"], *args]) == 2, args
        captured = capfd.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (args, captured.err)
        assert captured.out == ""
    with pytest.raises(CTPError, match="context of 256"):  # the same check from Python
        generate(made["model"], "a b c", made["prompt"], GenerateConfig(max_new_tokens=250))


def test_cli_process_exits_2_on_empty_stdin(made):
    proc = subprocess.run([sys.executable, "-m", "ctp.cli", "generate", made["model"]], input="",
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "ctp generate: error: empty input: give --text or lines on stdin"
