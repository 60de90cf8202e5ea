"""A small fuzzer: valid artifacts made here are damaged systematically (truncated, header bytes
flipped, JSON replaced by garbage or other types, required keys dropped, NaN/Inf tensors, recipe
sections of the wrong shape), and every command that reads them must answer with one line on
stderr naming the file, exit 2, write nothing, and print no number as if it were valid."""

import json
import os
import shutil
import struct

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import calib_ids
from ctp.cli import main
from ctp.compression.pipeline import compress
from ctp.config import CompressConfig, PromptConfig
from ctp.prompt.tune import tune_prompt


@pytest.fixture(scope="module")
def valid(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("valid")
    base = root / "base"
    shutil.copytree(tiny_dir("llama"), base)
    model = compress(str(base), CompressConfig(prune="wanda", quant="nf4"), root / "model",
                     calibration=calib_ids(4, 32), progress=False).out
    text = torch.randint(0, 60, (4000,), generator=torch.Generator().manual_seed(0))
    tune_prompt(str(model), PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=4, steps=2, seqlen=32, batch_size=2,
                                         eval_every=2, eval_windows=4),
                root / "prompt", train_ids=text, val_ids=text[:1000], progress=False)
    assert main(["stitch", str(root / "prompt"), str(model), "--out", str(root / "pair"),
                 "--no-progress"]) == 0
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "model": str(base), "workdir": str(root / "run"),
        "compress": {"m": {"prune": "magnitude", "quant": "none"}},
        "prompts": {"p": {"target": "m", "config": {"num_virtual_tokens": 2, "steps": 1}}},
        "eval": {"ppl": ["embedded"], "max_windows": 2}}))
    return root


def truncations(data: bytes):
    header = 8 + struct.unpack("<Q", data[:8])[0]
    for cut in (0, 4, 8, 20, header - 1, header + 3, len(data) // 2, len(data) - 1):
        yield f"truncated at {cut}", data[:cut]


def header_flips(data: bytes):
    header = 8 + struct.unpack("<Q", data[:8])[0]
    for pos in (0, 3, 8, 9, header // 2, header - 2):
        damaged = bytearray(data)
        damaged[pos] ^= 0xA5
        yield f"byte {pos} flipped", bytes(damaged)


def json_damages(meta: dict, required: list[str]):
    yield "garbage", b"{this is not json"
    yield "empty", b""
    for other in ([], 3, "text", None):
        yield f"a {type(other).__name__}", json.dumps(other).encode()
    for key in required:
        yield f"no {key}", json.dumps({k: v for k, v in meta.items() if k != key}).encode()
        yield f"{key} of the wrong type", json.dumps({**meta, key: [1, 2]}).encode()


def nonfinite_prompts(data: bytes):
    tensor = load_file_bytes(data)
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = tensor.clone()
        bad[1, 2] = value
        yield f"a prompt holding {value}", save_bytes(bad)
    yield "a prompt of the wrong width", save_bytes(torch.zeros(4, 48))
    yield "a 1-D prompt", save_bytes(torch.zeros(4))


def load_file_bytes(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(data)["prompt_embeddings"]


def save_bytes(tensor: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"prompt_embeddings": tensor.contiguous()})


def commands(root, out):
    model, prompt, pair = root / "model", root / "prompt", root / "pair"
    # tune-prompt trains on a small file: the embedded corpus would be tokenized again for every damage (minutes)
    text = root / "small.txt"
    text.write_text("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n\n" * 40)
    return {
        "eval": ["eval", str(model), "--ppl", "embedded", "--max-windows", "2", "--json"],
        "eval --prompt": ["eval", str(model), "--prompt", str(prompt), "--ppl", "embedded",
                          "--max-windows", "2", "--json"],
        "tune-prompt": ["tune-prompt", str(model), "--out", str(out), "--prompt-type", "input",
                        "--objective", "nll", "--data", str(text), "--val-data", str(text),
                        "--num-virtual-tokens", "2", "--steps", "1", "--seqlen", "32",
                        "--eval-windows", "2", "--json"],
        "stitch": ["stitch", str(prompt), str(model), "--ppl", "embedded", "--max-windows", "2",
                   "--out", str(out), "--json"],
        "transfer": ["transfer", "--prompts", str(prompt), "--models", str(model), "--dense",
                     str(root / "base"), "--max-windows", "2", "--out", str(out), "--json"],
        "push": ["push", str(pair), "--repo", "alice/x", "--dry-run", "--json"],
        "push prompt": ["push", str(prompt), "--repo", "alice/x", "--dry-run", "--json"],
    }


# file (relative to the valid root) -> how to damage it -> which commands read it
TARGETS = {
    "model/model.safetensors": (("truncations", "header_flips"), ("eval", "tune-prompt", "stitch", "transfer")),
    "prompt/adapter_model.safetensors": (("truncations", "header_flips", "nonfinite_prompts"),
                                         ("eval --prompt", "stitch", "transfer")),
    "model/ctp_compression.json": (("compression_json",), ("tune-prompt", "stitch", "transfer")),
    "prompt/ctp_prompt.json": (("prompt_json",), ("eval --prompt", "stitch", "transfer", "push prompt")),
    "pair/ctp_stitch.json": (("stitch_json",), ("push",)),
    "pair/ctp_compression.json": (("compression_json",), ("push",)),
}
REQUIRED = {
    "compression_json": ["base_model", "base_fingerprint", "compression", "label", "sparsity", "bits_per_weight"],
    "prompt_json": ["num_virtual_tokens", "hidden_size", "tokenizer_fingerprint", "base_fingerprint",
                    "prompt_config", "best_val_ppl"],
    "stitch_json": ["model", "prompt"],
}


def damages(kind: str, data: bytes):
    if kind in REQUIRED:
        return json_damages(json.loads(data), REQUIRED[kind])
    return {"truncations": truncations, "header_flips": header_flips,
            "nonfinite_prompts": nonfinite_prompts}[kind](data)


CASES = [(path, kind, command) for path, (kinds, cmds) in TARGETS.items() for kind in kinds for command in cmds]


@pytest.mark.parametrize("path,kind,command", CASES, ids=[f"{p}-{k}-{c}" for p, k, c in CASES])
def test_damaged_files_give_one_line_exit_2_and_nothing_written(valid, tmp_path, capfd, path, kind, command):
    root = tmp_path / "r"
    shutil.copytree(valid, root, ignore=shutil.ignore_patterns("run"))
    target = root / path
    pristine = target.read_bytes()
    out = tmp_path / "out"
    args = commands(root, out)[command]
    for what, data in damages(kind, pristine):
        target.write_bytes(data)
        capfd.readouterr()
        code = main([*args, "--no-progress"])
        captured = capfd.readouterr()
        err = [line for line in captured.err.splitlines() if line.strip()]
        case = f"{command} with {path} {what}"
        assert code == 2, (case, err[-3:])
        assert len(err) == 1 and err[0].startswith(f"ctp {args[0]}: error:"), (case, err)
        message = err[0].split(": error: ", 1)[1]
        named = target.name in message or str(target.parent) in message
        if kind == "nonfinite_prompts":  # a valid file holding a bad tensor: the check may say so
            named = named or "non-finite" in message or "hidden size" in message
        assert named, (case, err[0])
        assert captured.out == "", (case, captured.out)  # no number printed as if valid
        assert not out.exists() and not out.with_name("out.work").exists(), case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], case


@pytest.mark.parametrize("damage,message", [
    ("prompts: [a, b]", "'prompts' must map names"),
    ("compress: [a]", "'compress' must map names"),
    ("eval: [embedded]", "eval: expected a mapping"),
    ("model: 3", "'model' must name"),
    ("workdir: [x]", "'workdir' must be a folder path"),
    ("prompts: {p: [1]}", "expected the keys 'target' and 'config'"),
    ("prompts: {p: {target: m, config: [1]}}", "expected a mapping"),
    ("compress: {m: 3}", "expected a mapping"),
    ("compress: {m: {prune: [1]}}", "'prune' must be"),
    ("[1, 2]", "a recipe must be a mapping"),
    ("key: [unclosed", "not valid YAML"),
    ("\tmodel: x", "not valid YAML"),
])
def test_recipe_sections_of_the_wrong_shape(valid, tmp_path, capfd, damage, message):
    recipe = yaml.safe_load((valid / "recipe.yaml").read_text())
    recipe["workdir"] = str(tmp_path / "run")
    try:
        override = yaml.safe_load(damage)
    except yaml.YAMLError:
        override = None
    path = tmp_path / "recipe.yaml"
    if isinstance(override, dict):
        recipe.update(override)
        path.write_text(yaml.safe_dump(recipe))
    else:
        path.write_text(damage)
    capfd.readouterr()
    code = main(["run", str(path), "--no-progress"])
    captured = capfd.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and message in err[0] and str(path) in err[0], err
    assert captured.out == "" and not (tmp_path / "run").exists()


def test_non_finite_weights_are_an_error_not_a_perplexity(valid, tmp_path, capfd):
    """A model whose weights hold NaN (a bit-rotted but well-formed file) reports an error."""
    folder = tmp_path / "m"
    shutil.copytree(valid / "model", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.norm.weight"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for args in (["eval", str(folder), "--ppl", "embedded", "--max-windows", "2", "--json"],
                 ["tune-prompt", str(folder), "--out", str(tmp_path / "p"), "--prompt-type", "input",
                  "--objective", "nll", "--data", "embedded",
                  "--num-virtual-tokens", "2", "--steps", "1", "--seqlen", "32", "--eval-windows", "2"]):
        capfd.readouterr()
        code = main([*args, "--no-progress"])
        captured = capfd.readouterr()
        err = [line for line in captured.err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and "not finite" in err[0], err
        assert captured.out == "" and not (tmp_path / "p").exists()


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN mid-run stops tune-prompt with a clear error; the checkpoint
    written before stays, and resuming from it is possible."""
    from ctp.artifacts import find_checkpoint, load_checkpoint
    from ctp.errors import CTPError
    from ctp.prompt.objective import Objective
    from conftest import tiny_model

    calls = {"n": 0}
    real = Objective.loss

    def diverging(self, model, ids, context):
        calls["n"] += 1
        out = real(self, model, ids, context)
        return out * float("nan") if calls["n"] > 5 else out

    monkeypatch.setattr(Objective, "loss", diverging)
    text = torch.randint(0, 60, (4000,), generator=torch.Generator().manual_seed(0))
    config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=2, steps=10, seqlen=32, batch_size=2, eval_every=5,
                          eval_windows=2, save_every=4)
    with pytest.raises(CTPError, match="non-finite .* at step 6.*last good checkpoint"):
        tune_prompt(tiny_model(), config, tmp_path / "p", train_ids=text, val_ids=text[:1000],
                    progress=False)
    checkpoint = find_checkpoint(tmp_path / "p.work")
    tensors, state = load_checkpoint(checkpoint)
    assert state["step"] == 4 and torch.isfinite(tensors["prompt"]).all()
    assert not (tmp_path / "p").exists()


def test_output_folders_follow_the_umask(valid, tmp_path):
    """Written with the user's umask (not mkdtemp's private 700), so a shared cluster can read."""
    for umask, folder_mode, file_mode in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600)):
        old = os.umask(umask)
        try:
            out = compress(str(valid / "base"), CompressConfig(prune="magnitude", quant="nf4"),
                           tmp_path / oct(umask), progress=False).out
        finally:
            os.umask(old)
        assert out.stat().st_mode & 0o777 == folder_mode
        assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {file_mode}
