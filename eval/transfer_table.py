"""Does a prompt tuned on one compressed model help the others? (the README's transfer table)

    python eval/transfer_table.py        # ~12 minutes on 2 CPU cores

A recipe with the study's best prompt setting (10 tokens, 400 steps; see eval/prompt_study.py):
a prompt tuned on Wanda-50% + NF4 (rounded to nearest) is evaluated on NF4 alone, magnitude-50%,
Wanda-50% and Wanda-2:4 (each + NF4, rounded to nearest), and on SparseGPT-50% and SparseGPT-2:4
+ NF4 with OBS rounding -- copies whose gaps are far smaller -- on the embedded test split
(windows of 256). Writes eval/results/transfer_table.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctp.evaluation.transfer import transfer_table  # noqa: E402
from ctp.recipe import parse_recipe, run_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CALIB = {"calib": "embedded", "nsamples": 128, "seqlen": 512}
RECIPE = {
    "model": "embedded",
    "compress": {
        "nf4": {"prune": "none", "quant": "nf4", **CALIB},
        "magnitude-50pct+nf4": {"prune": "magnitude", "sparsity": 0.5, "quant": "nf4", **CALIB},
        "wanda-50pct+nf4": {"prune": "wanda", "sparsity": 0.5, "quant": "nf4", "rounding": "rtn", **CALIB},
        "wanda-2of4+nf4": {"prune": "wanda", "pattern": "2:4", "quant": "nf4", "rounding": "rtn", **CALIB},
        "sparsegpt-50pct+nf4-obs": {"prune": "sparsegpt", "sparsity": 0.5, "quant": "nf4", "rounding": "obs", **CALIB},
        "sparsegpt-2of4+nf4-obs": {"prune": "sparsegpt", "pattern": "2:4", "quant": "nf4", "rounding": "obs", **CALIB},
    },
    "prompts": {"p10-wanda-50pct+nf4": {"target": "wanda-50pct+nf4", "config": {
        "num_virtual_tokens": 10, "init": "vocab", "data": "embedded", "steps": 400, "lr": 0.01,
        "warmup_steps": 40, "seqlen": 256, "batch_size": 8, "eval_every": 50, "eval_windows": 64,
        "save_every": 100, "seed": 0, "device": "cpu"}}},
    "eval": {"ppl": ["embedded"], "seqlen": 256, "batch_size": 8, "device": "cpu"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ctp-eval-transfer")
    args = p.parse_args()
    started = time.time()
    recipe = parse_recipe({**RECIPE, "workdir": args.workdir}, "eval/transfer_table.py")
    result = run_recipe(recipe, progress=False)
    table = transfer_table(result)
    print(table)
    out = REPO / "eval" / "results" / "transfer_table"
    result["seconds"] = round(time.time() - started, 1)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text(table + "\n")
    shutil.copy(Path(args.workdir) / "results" / "transfer.png", f"{out}.png")


if __name__ == "__main__":
    main()
