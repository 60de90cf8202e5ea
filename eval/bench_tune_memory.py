"""Peak host memory of prompt training with and without gradient checkpointing, on the CPU.

    python eval/bench_tune_memory.py          # about 4 minutes on 2 cores

A random 8-layer Llama (hidden 1024, intermediate 2816, 16 heads, vocab 32000) stored in fp16 is
quantized to NF4 by ctp, then `tune_prompt` runs 2 steps of 4 x 512-token windows (10 virtual
tokens) in a fresh process per setting; each reports its peak RSS (ru_maxrss). The goal: peak
RSS with checkpointing at most 0.7x the peak without. Writes eval/results/bench_tune_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUN = """
import json, resource, sys, torch
from ctp.config import PromptConfig
from ctp.prompt.tune import tune_prompt
ids = torch.randint(0, 2048, (4 * 512 * 4 + 1024,), generator=torch.Generator().manual_seed(0))
config = PromptConfig(prompt_type="input", objective="nll", num_virtual_tokens=10, steps=2, seqlen=512,
                      batch_size=4, eval_every=10**6,
                      eval_windows=1, warmup_steps=0, device="cpu",
                      gradient_checkpointing=sys.argv[2] == "on")
result = tune_prompt(sys.argv[1], config, train_ids=ids, val_ids=ids[:1024], progress=False)
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "tokens_per_second": result.meta["train_tokens_per_second_this_run"]}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--out", default=str(REPO / "eval" / "results" / "bench_tune_memory.json"))
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from ctp.compression.pipeline import compress
    from ctp.config import CompressConfig

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                             max_position_embeddings=1024)
        torch.manual_seed(0)
        dense = Path(tmp) / "dense"
        AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(dense)
        AutoTokenizer.from_pretrained(REPO / "ctp" / "assets" / "embedded-llama").save_pretrained(dense)
        folder = Path(tmp) / "nf4"
        compress(str(dense), CompressConfig(prune="none", quant="nf4", device="cpu"), folder, progress=False)
        runs = {}
        for setting in ("off", "on"):
            proc = subprocess.run([sys.executable, "-c", RUN, str(folder), setting], capture_output=True,
                                  text=True, env=env)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            runs[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "model": f"random Llama, {args.layers} layers, hidden {args.hidden}, NF4 (CPU)",
        "batch": "4 x 512 tokens, 10 virtual tokens, 2 steps",
        "without_checkpointing": runs["off"], "with_checkpointing": runs["on"],
        "peak_rss_ratio": round(runs["on"]["peak_rss_bytes"] / runs["off"]["peak_rss_bytes"], 3),
        "tokens_per_second_ratio": round(runs["on"]["tokens_per_second"] / runs["off"]["tokens_per_second"], 3),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
