"""Test perplexity of the embedded model under each compression method (the README's table).

    python eval/compression_table.py            # ~15 minutes on 2 CPU cores

Writes eval/results/compression_table.{json,md}. Models go to a scratch work folder (reused if
the run is repeated). Calibration: 128 windows of 512 tokens from the embedded train split;
perplexity: the whole embedded test split, windows of 512 (the model's context). Rows: NF4;
magnitude / Wanda / SparseGPT at 50% and 2:4, with and without NF4; and OBS-rounded NF4
(``rounding: obs``) alone and after Wanda-50%, SparseGPT-50% and SparseGPT-2:4.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctp.config import CompressConfig, EvalConfig  # noqa: E402
from ctp.data import embedded_corpus_info  # noqa: E402
from ctp.demo import EMBEDDED_CALIB, compare, rows_table  # noqa: E402

C = EMBEDDED_CALIB
TARGETS = [
    CompressConfig(prune="none", quant="nf4", **C),
    CompressConfig(prune="none", quant="nf4", rounding="obs", **C),
    CompressConfig(prune="magnitude", sparsity=0.5, quant="none", **C),
    CompressConfig(prune="wanda", sparsity=0.5, quant="none", **C),
    CompressConfig(prune="sparsegpt", sparsity=0.5, quant="none", **C),
    CompressConfig(prune="magnitude", sparsity=0.5, quant="nf4", **C),
    CompressConfig(prune="wanda", sparsity=0.5, quant="nf4", **C),
    CompressConfig(prune="wanda", sparsity=0.5, quant="nf4", rounding="obs", **C),
    CompressConfig(prune="sparsegpt", sparsity=0.5, quant="nf4", **C),
    CompressConfig(prune="sparsegpt", sparsity=0.5, quant="nf4", rounding="obs", **C),
    CompressConfig(prune="magnitude", pattern="2:4", quant="none", **C),
    CompressConfig(prune="wanda", pattern="2:4", quant="none", **C),
    CompressConfig(prune="sparsegpt", pattern="2:4", quant="none", **C),
    CompressConfig(prune="magnitude", pattern="2:4", quant="nf4", **C),
    CompressConfig(prune="wanda", pattern="2:4", quant="nf4", **C),
    CompressConfig(prune="sparsegpt", pattern="2:4", quant="nf4", **C),
    CompressConfig(prune="sparsegpt", pattern="2:4", quant="nf4", rounding="obs", **C),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ctp-eval-compression")
    p.add_argument("--out", default="eval/results/compression_table")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    rows = compare("embedded", TARGETS, args.workdir, EvalConfig(ppl=["embedded"], device="cpu"),
                   progress=False)
    table = rows_table(rows)
    print(table)
    record = {"rows": rows, "table": table, "split": "test", "seqlen": 512,
              "corpus_sha256": {s: v["sha256"] for s, v in embedded_corpus_info()["splits"].items()},
              "seconds": round(time.time() - start, 1)}
    Path(args.out + ".json").write_text(json.dumps(record, indent=2) + "\n")
    Path(args.out + ".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
