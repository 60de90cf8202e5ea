"""ctp's SparseGPT against llm-compressor's SparseGPTModifier: quality and speed, in one run.

    bash eval/setup_llmcompressor_env.sh               # once: llm-compressor in its own venv
    python eval/bench_sparsegpt.py                     # ~10 minutes on 2 idle cores

Both tools get exactly the same calibration windows (32 x 256 tokens of the embedded train
split, seed 0, or random ids for the random model), block 128, dampening 1%, the decoder Linears
only, float32 on the CPU, and run in fresh processes one after the other (the machine must be
otherwise idle: a busy neighbour slows a 2-core run several-fold).

1. Quality on the embedded model: test perplexity (windows of 256) after SparseGPT at 50% and 2:4
   from each tool (target: ctp within 1% of llm-compressor, or better).
2. Speed on a random ~200M-parameter Llama (hidden 1024, 16 layers, intermediate 2816, vocab
   32000, fp16 on disk): llm-compressor's ``oneshot()`` time against ctp's layer-by-layer time
   (capture, statistics, sweeps and propagation: the same scope), and both whole processes
   (target: ctp <= 1.0x).
Writes eval/results/bench_sparsegpt.{json,md}. llm-compressor is never a ctp dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLMC_PYTHON = REPO / "eval" / ".venv-llmcompressor" / "bin" / "python"

CTP_RUN = """
import json, sys, time
started = time.perf_counter()
import torch
from safetensors.torch import load_file
from ctp.compression.pipeline import compress
from ctp.config import CompressConfig
model, calib, out, pattern = sys.argv[1:5]
torch.set_num_threads(2)
ids = load_file(calib)["input_ids"]
config = CompressConfig(prune="sparsegpt", pattern=pattern, quant="none", device="cpu")
result = compress(model, config, out, calibration=ids, progress=False)
print(json.dumps({"layers_s": result.report["prune_seconds"], "compress_s": result.report["seconds"],
                  "script_s": round(time.perf_counter() - started, 3),
                  "sparsity": result.report["sparsity"]["overall"]}))
"""


def calibration(path: Path, tokenizer_dir: str | None, vocab: int) -> None:
    import torch
    from safetensors.torch import save_file

    from ctp.data import calibration_ids
    from ctp.models import load_tokenizer

    if tokenizer_dir is not None:
        ids = calibration_ids(load_tokenizer(tokenizer_dir), "embedded", 32, 256, 0)
    else:
        ids = torch.randint(0, vocab, (32, 256), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids.contiguous()}, str(path))


def run_llmc(model: str, calib: Path, out: Path, pattern: str) -> dict:
    flag = ["--sparsity", "0.5"] if pattern == "unstructured" else ["--pattern", pattern]
    proc = subprocess.run([str(LLMC_PYTHON), str(REPO / "eval" / "llmcompressor_sparsegpt.py"), "--model", model,
                           "--calib", str(calib), "--out", str(out), "--threads", "2", *flag],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    timing = json.loads((out / "timing.json").read_text())
    return {"oneshot_s": timing["oneshot_s"], "script_s": timing["script_s"],
            "sparsity": timing["achieved_sparsity_decoder_linears"]}


def run_ctp(model: str, calib: Path, out: Path, pattern: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CTP_RUN, model, str(calib), str(out), pattern],
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ppl(folder: Path) -> float:
    from ctp.evaluation.api import perplexity

    return perplexity(str(folder), data="embedded", split="test", seqlen=256, batch_size=8, device="cpu").ppl


def random_llama(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=16, max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(folder)
    from ctp.models import load_tokenizer

    load_tokenizer("embedded").save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-speed", action="store_true", help="only the quality comparison")
    args = p.parse_args()
    if not LLMC_PYTHON.exists():
        sys.exit(f"{LLMC_PYTHON} not found: run `bash eval/setup_llmcompressor_env.sh` first")
    from ctp.models import resolve_model

    result: dict = {"quality": {}, "speed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        embedded = resolve_model("embedded")
        calibration(tmp / "calib-embedded.safetensors", embedded, 0)
        result["quality"]["dense"] = test_ppl(Path(embedded))
        for pattern in ("unstructured", "2:4"):
            row = {}
            for tool, run in (("llm-compressor", run_llmc), ("ctp", run_ctp)):
                out = tmp / f"{tool}-{pattern.replace(':', 'of')}"
                row[tool] = {**run(embedded, tmp / "calib-embedded.safetensors", out, pattern),
                             "ppl": test_ppl(out)}
            row["ctp_over_llmc_ppl"] = round(row["ctp"]["ppl"] / row["llm-compressor"]["ppl"], 4)
            result["quality"][pattern] = row
            print(json.dumps({pattern: row}), flush=True)
        if not args.skip_speed:
            random_llama(tmp / "random")
            calibration(tmp / "calib-random.safetensors", None, 32000)
            for pattern in ("unstructured", "2:4"):
                row = {}
                for tool, run in (("llm-compressor", run_llmc), ("ctp", run_ctp)):
                    row[tool] = run(str(tmp / "random"), tmp / "calib-random.safetensors",
                                    tmp / f"speed-{tool}-{pattern.replace(':', 'of')}", pattern)
                row["ctp_layers_over_oneshot"] = round(row["ctp"]["layers_s"] / row["llm-compressor"]["oneshot_s"], 3)
                row["ctp_over_llmc_whole_process"] = round(row["ctp"]["script_s"] / row["llm-compressor"]["script_s"], 3)
                result["speed"][pattern] = row
                print(json.dumps({pattern: row}), flush=True)
    result["load_average_after"] = os.getloadavg()
    out = REPO / "eval" / "results" / "bench_sparsegpt.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| pattern | tool | test ppl (embedded, 256) | time |", "|---|---|---:|---:|"]
    for pattern in ("unstructured", "2:4"):
        for tool in ("llm-compressor", "ctp"):
            q = result["quality"][pattern][tool]
            s = result["speed"].get(pattern, {}).get(tool)
            when = (f"{s['oneshot_s']:.1f} s oneshot" if tool == "llm-compressor" else f"{s['layers_s']:.1f} s layers") if s else ""
            lines.append(f"| {pattern} | {tool} | {q['ppl']:.3f} | {when} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
