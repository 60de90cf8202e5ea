"""The offline demo: compress the embedded model several ways, tune a prompt, measure on test.

``compare()`` is also what the benchmark scripts in ``eval/`` call, so the README's tables and
the demo come from one code path. Finished models found in the work folder (same config) are
reused, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._io import write_json
from .compress.pipeline import COMPRESSION_FILE, compress
from .config import CompressConfig, EvalConfig, PromptConfig, to_dict
from .evaluate.api import evaluate
from .models import EMBEDDED_NAME
from .prompt.artifact import PROMPT_FILE
from .prompt.tune import tune_prompt, work_dir

log = logging.getLogger(__name__)

# Calibration for the embedded model: 128 windows of its full 512-token context.
EMBEDDED_CALIB = dict(calib="embedded", nsamples=128, seqlen=512, seed=0)

DEMO_TARGETS: list[CompressConfig] = [
    CompressConfig(prune="none", quant="nf4", **EMBEDDED_CALIB),
    CompressConfig(prune="magnitude", sparsity=0.5, quant="nf4", **EMBEDDED_CALIB),
    CompressConfig(prune="wanda", sparsity=0.5, quant="nf4", **EMBEDDED_CALIB),
    CompressConfig(prune="wanda", pattern="2:4", quant="nf4", **EMBEDDED_CALIB),
]


def slug(config: CompressConfig) -> str:
    """A folder-safe name for a config's label, e.g. ``wanda-50pct+nf4``."""
    return re.sub(r"[^A-Za-z0-9+._-]", "-", config.label().replace("%", "pct").replace(":", "of"))


def _is_complete(folder: Path, config: CompressConfig) -> bool:
    meta = folder / COMPRESSION_FILE
    return meta.exists() and json.loads(meta.read_text()).get("compression") == to_dict(config)


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
        if _is_complete(folder, config):
            log.info("reusing %s", folder)
            report = json.loads((folder / COMPRESSION_FILE).read_text())
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
    """Markdown: test perplexity per model, its change against the dense row, and (for prompted
    rows) the share of the log-perplexity gap recovered."""
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


DEMO_PROMPT = dict(num_virtual_tokens=50, init="vocab", data="embedded", steps=200, lr=1e-2,
                   warmup_steps=20, seqlen=256, batch_size=8, eval_every=50, eval_windows=64,
                   save_every=50, seed=0, device="cpu")
DEMO_SEQLEN = 256  # test windows: room for the prompt within the model's 512-token context


def tune_and_measure(model_dir: str, prompt_config: PromptConfig, prompt_dir: Path,
                     eval_config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Tune a prompt on ``model_dir`` (reusing a finished one in ``prompt_dir``) and measure the
    pair on ``eval_config``'s test sets."""
    meta_path = prompt_dir / PROMPT_FILE
    if not (meta_path.exists()
            and json.loads(meta_path.read_text()).get("prompt_config") == to_dict(prompt_config)):
        tune_prompt(model_dir, prompt_config, prompt_dir, overwrite=True,
                    resume=(work_dir(prompt_dir) / "checkpoint" / "state.json").exists(),
                    progress=progress)
    result = evaluate(model_dir, eval_config, prompt=str(prompt_dir), progress=progress)
    meta = json.loads(meta_path.read_text())
    return {"label": f"{meta.get('compression_label', model_dir)} + prompt", "model": model_dir,
            "prompt": str(prompt_dir), "ppl": result["ppl"], "best_val_ppl": meta["best_val_ppl"],
            "prompt_parameters": meta["num_virtual_tokens"] * meta["hidden_size"]}


def recovered(dense: float, compressed: float, prompted: float) -> float:
    """Share of the log-perplexity gap a prompt wins back."""
    return (math.log(compressed) - math.log(prompted)) / (math.log(compressed) - math.log(dense))


def run_demo(workdir: str | Path = "ctp-demo", quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """The whole method on the embedded model: compress it four ways, tune a prompt on Wanda-50%
    + NF4, and measure everything on the test split. Writes ``results.json`` in ``workdir``."""
    workdir = Path(workdir)
    targets = DEMO_TARGETS
    eval_config = EvalConfig(ppl=["embedded"], device="cpu", seqlen=DEMO_SEQLEN)
    prompt_settings = dict(DEMO_PROMPT)
    if quick:
        targets = [replace(t, nsamples=16) for t in targets[:3:2]]
        eval_config = EvalConfig(ppl=["embedded"], device="cpu", seqlen=DEMO_SEQLEN, max_windows=40)
        prompt_settings.update(steps=20, eval_every=10, eval_windows=16)
    rows = compare(EMBEDDED_NAME, targets, workdir, eval_config, progress=progress)
    tuned_on = next(r for r in rows if r["label"] == "wanda-50%+nf4")
    prompt_row = tune_and_measure(tuned_on["model"], PromptConfig(**prompt_settings),
                                  workdir / "prompts" / Path(tuned_on["model"]).name, eval_config, progress)
    dense, compressed = rows[0]["ppl"]["embedded"], tuned_on["ppl"]["embedded"]
    prompt_row["recovered"] = recovered(dense, compressed, prompt_row["ppl"]["embedded"])
    rows.append(prompt_row)
    table = rows_table(rows)
    result = {"rows": rows, "table": table, "split": "test", "seqlen": DEMO_SEQLEN}
    write_json(workdir / "results.json", result)
    return result
