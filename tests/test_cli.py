"""The CLI: bad input gives one line on stderr, exit 2, and writes nothing."""

import json

import pytest

from conftest import run_cli
from ctp.cli import main


def error_line(capfd):
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("far too short for a calibration window")
    return path


def test_bad_inputs_exit_2_with_one_line_and_no_folder(tmp_path, tiny_dir, short_text, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = str(tiny_dir("llama"))
    out = tmp_path / "out"
    capfd.readouterr()  # drop what building the fixtures printed
    cases = [
        (["/no/such/model"], "not found"),
        (["no-such-org/no-such-model-xyz"], "cannot load model"),
        ([model, "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        ([model, "--sparsity", "-0.5"], "sparsity must be in [0, 1)"),
        ([model, "--pattern", "4:2"], "0 < N < M"),
        ([model, "--pattern", "2-4"], "N:M"),
        ([model, "--pattern", "2:3", "--prune", "magnitude"], "divisible by 3"),
        ([model, "--prune", "obs"], "invalid choice"),
        ([model, "--quant", "int3"], "invalid choice"),
        ([model, "--calib", str(short_text), "--seqlen", "64", "--nsamples", "2"], "too short for one window"),
        ([model, "--calib", str(tmp_path / "nope.txt")], "unknown text source"),
        ([model, "--nsamples", "0"], "nsamples must be positive"),
        ([model, "--nsamples", "-3"], "nsamples must be positive"),
        ([model, "--device", "cuda"], "no CUDA GPU"),
        ([model, "--seqlen", "100000", "--calib", "embedded"], "exceeds the model's context"),
    ]
    for args, message in cases:
        code = main(["compress", *args, "--out", str(out), "--no-progress"])
        line = error_line(capfd)
        assert code == 2, (args, line)
        assert message in line, (args, line)
        assert not out.exists(), args
    assert [p.name for p in tmp_path.iterdir()] == ["short.txt"]  # no temporary leftovers


def test_existing_output_needs_overwrite(tmp_path, tiny_dir, capfd):
    out = tmp_path / "out"
    out.mkdir()
    model = str(tiny_dir("llama"))
    capfd.readouterr()
    code = main(["compress", model, "--out", str(out), "--prune", "magnitude"])
    assert code == 2 and "--overwrite" in error_line(capfd)
    assert list(out.iterdir()) == []


def test_quantization_on_unsupported_platform(tmp_path, tiny_dir, capfd, monkeypatch):
    import bitsandbytes.functional as F

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(F, "quantize_4bit", unsupported)
    model = str(tiny_dir("llama"))
    capfd.readouterr()
    code = main(["compress", model, "--out", str(tmp_path / "out"), "--quant", "nf4"])
    line = error_line(capfd)
    assert code == 2 and "nf4 quantization is not supported on cpu" in line
    assert not (tmp_path / "out").exists()


def test_eval_bad_inputs(tmp_path, tiny_dir, capfd):
    tiny_dir("llama")
    capfd.readouterr()
    assert main(["eval", str(tmp_path / "missing"), "--ppl", "embedded"]) == 2
    assert "not found" in error_line(capfd)
    assert main(["eval", str(tiny_dir("llama")), "--ppl", str(tmp_path / "none.txt")]) == 2
    assert "unknown text source" in error_line(capfd)
    assert main(["eval", str(tiny_dir("llama")), "--ppl", "embedded", "--prompt", str(tmp_path)]) == 2
    assert "not a prompt folder" in error_line(capfd)


def test_compress_then_eval_end_to_end_in_a_subprocess(tmp_path, tiny_dir):
    out = tmp_path / "out"
    proc = run_cli("compress", str(tiny_dir("llama")), "--out", str(out), "--calib", "embedded",
                   "--nsamples", "4", "--seqlen", "64", "--pattern", "2:4", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["label"] == "sparsegpt-2:4+nf4-obs"  # the defaults
    assert report["calibration"]["nsamples"] == 4
    assert "sparsity     overall" in proc.stderr and "Traceback" not in proc.stderr
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    import torch

    # this process's thread count: the very computation perplexity_of_ids does below
    proc = run_cli("eval", str(out), "--ppl", str(text), "--seqlen", "32", "--json", "--no-progress",
                   env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["details"]["t.txt"]["seqlen"] == 32
    from ctp.data import tokenize
    from ctp.evaluation.perplexity import perplexity_of_ids
    from ctp.models import load_any, load_tokenizer

    expected = perplexity_of_ids(load_any(str(out)), tokenize(load_tokenizer(str(out)), text.read_text()), 32)
    assert result["ppl"]["t.txt"] == pytest.approx(expected.ppl, rel=1e-6)


def test_lm_eval_passes_arguments_through(capsys):
    assert main(["lm-eval", "--help"]) == 0
    out = capsys.readouterr().out  # lm-eval's own help, not ctp's argparse usage
    assert "Language Model Evaluation Harness" in out and "lm-eval run --model hf" in out


def test_import_ctp_registers_lm_eval_model_lazily():
    import subprocess
    import sys

    code = ("import sys, ctp; from lm_eval.api.registry import get_model; "
            "assert 'torch' not in sys.modules; "
            "assert get_model('ctp').__name__ == 'CTPLM'; get_model('hf')")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_named_models_in_the_help_are_the_named_models():
    from ctp.cli import NAMED_HELP
    from ctp.zoo import NAMED_MODELS

    assert {word for word in NAMED_HELP.replace(",", " ").split() if word in NAMED_MODELS} == set(NAMED_MODELS)


def test_demo_choices_are_one_line_errors(capfd):
    code = main(["demo", "--model", "smollm2-135m", "--quick", "--no-progress"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "smoke run of the embedded demo" in err[0]
    code = main(["demo", "--model", "gpt2"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "invalid choice" in err[0]


def test_eval_help_says_how_each_corpus_is_joined(capsys):
    """The help text says what load_text does: each corpus joined as its published code joins it."""
    from ctp.data import DOCUMENT_JOINER, HUB_SOURCES

    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert HUB_SOURCES["wikitext2"].joiner == DOCUMENT_JOINER == "\n\n"
    assert HUB_SOURCES["c4"].joiner == HUB_SOURCES["ptb"].joiner == " "
    assert 'WikiText-2, the embedded corpus and local files with "\\n\\n", C4 and PTB with a single space' in text
    assert "blank lines" not in text
