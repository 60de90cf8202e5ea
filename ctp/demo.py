"""The offline demo (``run_demo``: the packaged demo recipe) and ``compare()``, which the
compression benchmark in ``eval/`` uses: compress one model several ways and measure each,
reusing finished models found in the work folder (same config).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from .artifacts import read_compression_meta
from .compression.pipeline import compress, is_complete
from .config import DEMO_RECIPES, CompressConfig, EvalConfig
from .errors import CTPError
from .evaluation.api import evaluate

log = logging.getLogger(__name__)

# Calibration for the embedded model: 128 windows of its full 512-token context.
EMBEDDED_CALIB = dict(calib="embedded", nsamples=128, seqlen=512, seed=0)

def slug(config: CompressConfig) -> str:
    """A folder-safe name for a config's label, e.g. ``wanda-50pct+nf4``."""
    return re.sub(r"[^A-Za-z0-9+._-]", "-", config.label().replace("%", "pct").replace(":", "of"))


def compare(
    model: str,
    targets: list[CompressConfig],
    workdir: str | Path,
    eval_config: EvalConfig,
    include_dense: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Compress ``model`` once per target into ``workdir/models`` and measure each.

    Returns one row per model (dense first): label, folder, perplexities, and for compressed
    models their achieved sparsity, bits per weight and compression time.
    """
    workdir = Path(workdir)
    rows = []
    if include_dense:
        result = evaluate(model, eval_config, progress=progress)
        rows.append({"label": "dense", "model": model, "ppl": result["ppl"]})
    for config in targets:
        folder = workdir / "models" / slug(config)
        if is_complete(folder, config):
            log.info("reusing %s", folder)
            report = read_compression_meta(folder, required=True)
        else:
            log.info("compressing %s -> %s", config.label(), folder)
            report = compress(model, config, folder, overwrite=True, progress=progress).report
        result = evaluate(str(folder), eval_config, progress=progress)
        rows.append({
            "label": config.label(), "model": str(folder), "ppl": result["ppl"],
            "sparsity": report["sparsity_after_pruning"]["overall"],
            "stored_zeros": report["sparsity"]["overall"],
            "bits_per_weight": report["bits_per_weight"],
            "compress_seconds": report["seconds"],
        })
    return rows


def rows_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: test perplexity per model and its change against the dense row."""
    sets = list(rows[0]["ppl"])
    dense = rows[0]["ppl"] if rows[0]["label"] == "dense" else None
    head = ["model", "pruned", "bits/weight", *(f"ppl {s}" for s in sets)]
    if dense:
        head += [f"vs dense ({s})" for s in sets]
    prompted = any("recovered" in r for r in rows)
    if prompted:
        head.append("gap recovered")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["label"], f"{r['sparsity']:.1%}" if "sparsity" in r else ("" if "prompt" in r else "0%"),
                 f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else ("" if "prompt" in r else "16 (fp16)")]
        cells += [f"{r['ppl'][s]:.3f}" for s in sets]
        if dense:
            cells += [f"{(r['ppl'][s] / dense[s] - 1) * 100:+.1f}%" for s in sets]
        if prompted:
            cells.append(f"{r['recovered'] * 100:.1f}%" if "recovered" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUICK_SETS = [  # a smoke run of the demo recipe, for tests
    "compress.nf4.nsamples=16", "compress.sparsegpt-50pct+nf4.nsamples=16",
    "prompts.p10-sparsegpt-50pct+nf4.config.steps=20", "prompts.p10-sparsegpt-50pct+nf4.config.eval_every=10",
    "prompts.p10-sparsegpt-50pct+nf4.config.eval_windows=16", "eval.max_windows=40",
]


def run_demo(workdir: str | Path | None = None, quick: bool = False, progress: bool = True,
             model: str = "embedded") -> dict[str, Any]:
    """``ctp run demo`` (or ``demo-smollm2`` for ``model="smollm2-135m"``) in ``workdir``
    (default: the recipe's): compress the model several ways, tune a prompt on one compressed
    copy, evaluate it on every copy. ``quick`` runs a smoke version of the embedded demo."""
    from .evaluation.transfer import transfer_table
    from .recipe import load_recipe, run_recipe

    if model not in DEMO_RECIPES:
        raise CTPError(f"no demo for {model!r}; choose from {', '.join(DEMO_RECIPES)}")
    if quick and model != "embedded":
        raise CTPError("--quick is a smoke run of the embedded demo")
    recipe = load_recipe(DEMO_RECIPES[model], QUICK_SETS if quick else [])
    if workdir is not None:
        recipe.workdir = Path(workdir)  # a path, not YAML
    if quick:
        recipe.compress = {k: v for k, v in recipe.compress.items() if k in ("nf4", "sparsegpt-50pct+nf4")}
    result = run_recipe(recipe, progress=progress)
    result["table"] = transfer_table(result)
    return result
