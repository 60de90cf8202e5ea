"""Time and host memory of `ctp compress` on a random Llama-shaped model, on the CPU.

    python eval/bench_compress_memory.py                       # Wanda 50% + NF4, ~220M parameters
    python eval/bench_compress_memory.py --prune sparsegpt --rounding obs

Builds a random Llama (hidden 1024, 12 layers, intermediate 2816, vocab 32000: 220M parameters)
saved in fp16 like a real checkpoint, then measures, each in a fresh process in this environment:

1. the baseline: importing transformers, loading that model in its stored dtype (fp16) and
   reading every weight (a lazily mapped load that never touches its pages would be no baseline);
   and, for reference, the same load in fp32 (what a CPU compression held before it kept the
   stored dtype);
2. `ctp compress MODEL --prune wanda --sparsity 0.5 --quant nf4` on the CPU (wall time, peak RSS):
   the model held in fp16, one decoder layer at a time computed in fp32.

Reports peak RSS of (2) relative to the fp16 load -- the goal is at most 1.3x -- and to the fp32
load and the model's fp32 size in bytes. Writes eval/results/bench_compress_memory[-LABEL].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = """
import resource, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
total = sum(float(p.double().sum()) for p in model.parameters())  # every weight read
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_model(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).half()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO / "ctp" / "assets" / "embedded-llama").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--prune", default="wanda")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--rounding", default="rtn")
    p.add_argument("--out", help="result file (default: eval/results/bench_compress_memory[-LABEL].json)")
    args = p.parse_args()
    label = "" if (args.prune, args.quant, args.rounding) == ("wanda", "nf4", "rtn") else \
        f"-{args.prune}-{args.quant}-{args.rounding}"
    out = Path(args.out or REPO / "eval" / "results" / f"bench_compress_memory{label}.json")

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = make_model(model_dir, args.hidden, args.layers, args.intermediate, args.vocab)
        fp32_bytes = params * 4

        baselines = {}
        for dtype in ("float16", "float32"):
            base = subprocess.run([sys.executable, "-c", BASELINE, str(model_dir), dtype], capture_output=True,
                                  text=True, env=env, check=True)
            baselines[dtype] = int(base.stdout.strip().splitlines()[-1])
        baseline_rss = baselines["float16"]

        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "ctp.cli", "compress", str(model_dir), "--out", str(Path(tmp) / "out"),
             "--prune", args.prune, "--quant", args.quant, "--rounding", args.rounding, "--calib", "embedded",
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu",
             "--json", "--no-progress"],
            capture_output=True, text=True, env=env,
        )
        wall = time.time() - started
        if proc.returncode:
            sys.exit(proc.stderr)
        report = json.loads(proc.stdout)
        compress_rss = report["peak_memory"]["cpu_peak_rss_bytes"]

    result = {
        "compression": report["label"],
        "parameters": params,
        "fp32_bytes": fp32_bytes,
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen},
        "baseline_fp16_load_peak_rss_bytes": baseline_rss,
        "baseline_fp32_load_peak_rss_bytes": baselines["float32"],
        "compress_peak_rss_bytes": compress_rss,
        "compress_rss_over_baseline": round(compress_rss / baseline_rss, 3),
        "compress_rss_over_fp32_load": round(compress_rss / baselines["float32"], 3),
        "compress_rss_over_fp32_size": round(compress_rss / fp32_bytes, 3),
        "baseline_rss_over_fp32_size": round(baselines["float32"] / fp32_bytes, 3),
        "compress_wall_seconds": round(wall, 1),
        "compress_internal_seconds": report["seconds"],
        "prune_seconds": report["prune_seconds"],
        "sparsity": report["sparsity"]["overall"],
        "bits_per_weight": report["bits_per_weight"],
        "cpu_count": os.cpu_count(),
        "machine_peak_rss_this_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(result, indent=2))
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
