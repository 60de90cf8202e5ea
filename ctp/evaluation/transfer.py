"""The transfer matrix: every prompt on every model, plus each model without a prompt.

Each cell is a test perplexity under the same protocol and window length, and the share of that
model's log-perplexity gap (against the dense base) the prompt wins back:
``(log ppl_model - log ppl_model+prompt) / (log ppl_model - log ppl_dense)``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..artifacts import COMPRESSION_FILE, atomic_dir, read_compression_meta, read_json, read_prompt_meta, write_json
from ..data import load_text, source_label, tokenize
from ..errors import CTPError
from ..lm import bos_token, default_seqlen
from ..models import load_any, load_tokenizer
from ..plots import plot_heatmap
from ..prompt.kinds import context_of, load_prompt
from ..prompt.stitch import check_compatible
from .perplexity import perplexity_of_ids

log = logging.getLogger(__name__)


def gap_recovered(dense: float, compressed: float, prompted: float) -> float | None:
    """Share of the log-perplexity gap won back (None when there is no gap to speak of)."""
    gap = math.log(compressed) - math.log(dense)
    if abs(gap) < 1e-9:
        return None
    return (math.log(compressed) - math.log(prompted)) / gap


def model_label(model_dir: str) -> str:
    """A model's short name: its compression label, else its folder's name."""
    meta = read_compression_meta(model_dir) if Path(model_dir).is_dir() else None
    return meta["label"] if meta is not None else Path(model_dir).name


def prompt_label(prompt_dir: str) -> str:
    """A prompt's short name, ``<kind><n>[-<objective>]@<what it was tuned on>`` (``p10@...``:
    an input prompt of 10 tokens trained with next-token loss; ``kv10-kd@...``: a key/value prompt
    trained by distillation; ``kv10-start@...``: its start, 0 steps, no loss), else its folder's
    name."""
    meta = read_prompt_meta(prompt_dir)
    trained_on = meta.get("compression_label")
    if not trained_on:
        return Path(prompt_dir).name
    kind = "kv" if meta.get("prompt_type") == "kv" else "p"
    objective = "start" if meta.get("steps") == 0 else meta.get("objective", "nll")
    return f"{kind}{meta['num_virtual_tokens']}{'' if objective == 'nll' else '-' + objective}@{trained_on}"


def transfer(
    prompts: list[str],
    models: list[str],
    data: str = "embedded",
    split: str = "test",
    seqlen: int | None = None,
    dense: str | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    progress: bool = True,
    bos: str = "auto",
) -> dict[str, Any]:
    """Evaluate every prompt on every model (and each model bare, and the dense base).

    Args:
        dense: the uncompressed base for the recovered share; default: the ``base_model`` named
            in the first model's ``ctp_compression.json``.
        seqlen: one window length for every cell; default: the first model's context (at most
            4096) less the longest prompt (and BOS).
        bos: the BOS rule, the same for every cell (:func:`ctp.lm.bos_token`).
    Returns:
        ``{"data", "split", "seqlen", "dense", "models", "prompts", "cells"}`` where
        ``cells[i][j]`` is prompt ``j`` on model ``i``: ``{"ppl", "recovered"}`` or ``{"error"}``.
    """
    if not prompts or not models:
        raise CTPError("give at least one prompt and one model")
    tensors = {p: load_prompt(p) for p in prompts}  # every artifact read and checked
    metas = {p: read_prompt_meta(p) for p in prompts}  # before any model is evaluated
    labels = {m: model_label(m) for m in models}
    for m in models:  # two copies of one method (another calibration seed, say): their folder names
        if list(labels.values()).count(labels[m]) > 1:
            labels = {k: (Path(k).name if v == labels[m] else v) for k, v in labels.items()}
    if dense is None:
        first = read_compression_meta(models[0]) if Path(models[0]).is_dir() else None
        if first is None:
            raise CTPError(f"{models[0]} has no {COMPRESSION_FILE}: name the dense base with --dense")
        dense = first["base_model"]
    text = load_text(data, split)
    longest = max(t.num_virtual_tokens for t in tensors.values())

    dense_model = load_any(dense, device=device)
    dense_tokenizer = load_tokenizer(dense)
    dense_bos = bos_token(bos, dense_model.config, dense_tokenizer)
    if seqlen is None:
        seqlen = default_seqlen(dense_model, longest + int(dense_bos is not None))
    ids = tokenize(dense_tokenizer, text, dense_bos)
    dense_ppl = perplexity_of_ids(dense_model, ids, seqlen, context_of(dense_model, None, dense_bos),
                                  batch_size=batch_size, max_windows=max_windows,
                                  progress=progress, desc="dense").ppl
    del dense_model
    rows, cells = [], []
    for model_dir in models:
        model = load_any(model_dir, device=device)
        tokenizer = load_tokenizer(model_dir)
        bos_id = bos_token(bos, model.config, tokenizer)
        model_ids = tokenize(tokenizer, text, bos_id)
        bare = perplexity_of_ids(model, model_ids, seqlen, context_of(model, None, bos_id),
                                 batch_size=batch_size, max_windows=max_windows,
                                 progress=progress, desc=labels[model_dir]).ppl
        rows.append({"model": model_dir, "label": labels[model_dir], "ppl": bare,
                     "gap_vs_dense": bare / dense_ppl - 1})
        row = []
        for prompt_dir in prompts:
            try:
                for w in check_compatible(prompt_dir, tensors[prompt_dir], metas[prompt_dir],
                                          model_dir, model, tokenizer):
                    log.warning(w)
            except CTPError as exc:
                row.append({"error": str(exc)})
                continue
            ppl = perplexity_of_ids(model, model_ids, seqlen,
                                    context_of(model, tensors[prompt_dir], bos_id), batch_size=batch_size, max_windows=max_windows, progress=progress,
                                    desc=f"{labels[model_dir]} + {prompt_label(prompt_dir)}").ppl
            row.append({"ppl": ppl, "recovered": gap_recovered(dense_ppl, bare, ppl)})
        cells.append(row)
    return {
        "data": source_label(data), "split": split, "seqlen": seqlen, "bos": bos,
        "dense": {"model": dense, "ppl": dense_ppl},
        "models": rows,
        "prompts": [{"prompt": p, "label": prompt_label(p), "trained_on": metas[p].get("model"),
                     "prompt_type": tensors[p].kind,
                     "num_virtual_tokens": tensors[p].num_virtual_tokens} for p in prompts],
        "cells": cells,
    }


def transfer_table(result: dict[str, Any]) -> str:
    """Markdown: one row per model, its bare perplexity, then each prompt's ppl (recovered)."""
    head = ["model", "no prompt"] + [p["label"] for p in result["prompts"]]
    lines = [f"Test perplexity on {result['data']} ({result['split']}, windows of {result['seqlen']}); "
             f"dense {result['dense']['ppl']:.3f}. In brackets: share of the gap recovered.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row, cells in zip(result["models"], result["cells"]):
        parts = [row["label"], f"{row['ppl']:.3f}"]
        for cell in cells:
            if "error" in cell:
                parts.append("incompatible")
            elif cell["recovered"] is None:
                parts.append(f"{cell['ppl']:.3f}")
            else:
                parts.append(f"{cell['ppl']:.3f} ({cell['recovered'] * 100:.0f}%)")
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def write_transfer(result: dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """``transfer.json``, ``transfer.md`` and ``transfer.png`` into ``out`` (atomically)."""
    with atomic_dir(out, overwrite) as staging:
        write_json(staging / "transfer.json", result)
        (staging / "transfer.md").write_text(transfer_table(result) + "\n")
        plot_heatmap(result, staging / "transfer.png")
    return Path(out)


def load_transfer(folder: str | Path) -> dict[str, Any]:
    """A transfer result written by :func:`write_transfer`."""
    return read_json(Path(folder) / "transfer.json")
