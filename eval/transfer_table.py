"""Does a prompt tuned on one compressed model help the others? (the README's transfer table)

    python eval/transfer_table.py        # ~8 minutes on 2 CPU cores

Runs the demo recipe with the study's best prompt setting (10 tokens, 400 steps; see
eval/prompt_study.py): a prompt tuned on Wanda-50% + NF4 is evaluated on NF4-only,
magnitude-50% + NF4, Wanda-50% + NF4 and Wanda-2:4 + NF4, on the embedded test split (windows of
256). Writes eval/results/transfer_table.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctp.evaluate.transfer import transfer_table  # noqa: E402
from ctp.recipe import load_recipe, run_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "prompts.p10-wanda-50pct+nf4.config"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ctp-eval-transfer")
    args = p.parse_args()
    started = time.time()
    recipe = load_recipe("demo", [f"workdir={args.workdir}", f"{PROMPT}.steps=400",
                                  f"{PROMPT}.warmup_steps=40", f"{PROMPT}.save_every=100"])
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
