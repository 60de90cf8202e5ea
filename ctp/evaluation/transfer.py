"""The transfer matrix: every prompt on every model, plus each model without a prompt.

Each cell is a test perplexity under the same protocol and window length, and the share of that
model's log-perplexity gap (against the dense base) the prompt wins back:
``(log ppl_model - log ppl_model+prompt) / (log ppl_model - log ppl_dense)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..artifacts import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, COMPRESSION_FILE, atomic_dir, read_compression_meta,
                         read_json, read_prompt_meta, write_json)
from ..data import load_text, source_label, tokenize
from ..errors import CTPError
from ..lm import bos_token, default_seqlen
from ..models import check_supported, load_any, load_tokenizer
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


def _distinct(labels: dict[str, str]) -> dict[str, str]:
    """Short names, except that folders whose short names coincide (two copies of one method
    with other calibration seeds; two prompts of one kind with other learning rates) are named
    by their folder names."""
    names = list(labels.values())
    return {k: (Path(k).name if names.count(v) > 1 else v) for k, v in labels.items()}


class CellCache:
    """Finished cells of transfer matrices, one JSON object a line: what each cell's perplexity
    depends on -- the model's files (names, sizes, modification times: a model compressed again
    is a new model), the prompt tensor's sha256, and the evaluation settings -- hashed into its
    key. A missing file (``path=None``) caches nothing."""

    def __init__(self, path: str | os.PathLike | None, settings: dict[str, Any]) -> None:
        self.path = None if path is None else Path(path)
        self.settings = settings
        self.cells: dict[str, float] = {}
        self._identities: dict[str, Any] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.cells[str(entry["key"])] = float(entry["ppl"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted write: that cell is redone

    def _identity(self, folder: str) -> Any:
        if folder not in self._identities:
            path = Path(folder)
            if not path.is_dir():  # a hub id or named model: its name is its identity
                self._identities[folder] = folder
            else:
                self._identities[folder] = sorted(
                    (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                    if f.is_file() and f.suffix in (".safetensors", ".json"))
        return self._identities[folder]

    def _prompt_identity(self, folder: str) -> str:
        if folder not in self._identities:
            digest = hashlib.sha256()
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):  # the prompt's kind and its tensor
                digest.update((Path(folder) / name).read_bytes())
            self._identities[folder] = digest.hexdigest()
        return self._identities[folder]

    def key(self, model: str, prompt: str | None) -> str:
        parts = {"settings": self.settings, "model": [model, self._identity(model)],
                 "prompt": None if prompt is None else [prompt, self._prompt_identity(prompt)]}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, model: str, prompt: str | None) -> float | None:
        """The cached perplexity of ``prompt`` (None: bare) on ``model``, if there is one."""
        if self.path is None:
            return None
        value = self.cells.get(self.key(model, prompt))
        if value is not None:
            log.info("%s%s: cached, %.4f", model, "" if prompt is None else f" + {prompt}", value)
        return value

    def put(self, model: str, prompt: str | None, ppl: float) -> float:
        """Record a finished cell (appended and flushed at once) and return its perplexity."""
        if self.path is not None:
            key = self.key(model, prompt)
            self.cells[key] = ppl
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({"key": key, "model": model, "prompt": prompt, "ppl": ppl}) + "\n")
        return ppl


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
    cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate every prompt on every model (and each model bare, and the dense base).

    Args:
        dense: the uncompressed base for the recovered share; default: the ``base_model`` named
            in the first model's ``ctp_compression.json``.
        seqlen: one window length for every cell; default: the first model's context (at most
            4096) less the longest prompt (and BOS).
        bos: the BOS rule, the same for every cell (:func:`ctp.lm.bos_token`).
        cache: a JSON-lines file of finished cells (:class:`CellCache`): a cell whose model files,
            prompt tensor and evaluation settings are unchanged is read, not evaluated again, and
            a model whose every cell is there is not loaded.
    Returns:
        ``{"data", "split", "seqlen", "dense", "models", "prompts", "cells"}`` where
        ``cells[i][j]`` is prompt ``j`` on model ``i``: ``{"ppl", "recovered"}`` or ``{"error"}``.
    """
    if not prompts or not models:
        raise CTPError("give at least one prompt and one model")
    tensors = {p: load_prompt(p) for p in prompts}  # every artifact read and checked
    metas = {p: read_prompt_meta(p) for p in prompts}  # before any model is evaluated
    labels = _distinct({m: model_label(m) for m in models})
    prompt_labels = _distinct({p: prompt_label(p) for p in prompts})
    if dense is None:
        first = read_compression_meta(models[0]) if Path(models[0]).is_dir() else None
        if first is None:
            raise CTPError(f"{models[0]} has no {COMPRESSION_FILE}: name the dense base with --dense")
        dense = first["base_model"]
    text = load_text(data, split)
    longest = max(t.num_virtual_tokens for t in tensors.values())

    dense_tokenizer = load_tokenizer(dense)
    dense_bos = bos_token(bos, check_supported(dense), dense_tokenizer)
    if seqlen is None:
        seqlen = default_seqlen(check_supported(dense), longest + int(dense_bos is not None))
    cached = CellCache(cache, {"data": source_label(data), "split": split, "seqlen": seqlen,
                               "max_windows": max_windows, "batch_size": batch_size, "bos": bos,
                               "device": str(device)})
    dense_ppl = cached.get(dense, None)
    if dense_ppl is None:
        dense_model = load_any(dense, device=device)
        ids = tokenize(dense_tokenizer, text, dense_bos)
        dense_ppl = cached.put(dense, None, perplexity_of_ids(
            dense_model, ids, seqlen, context_of(dense_model, None, dense_bos), batch_size=batch_size,
            max_windows=max_windows, progress=progress, desc="dense").ppl)
        del dense_model
    rows, cells = [], []
    for model_dir in models:
        bare = cached.get(model_dir, None)
        row = [cached.get(model_dir, p) for p in prompts]
        if bare is None or any(c is None for c in row):
            model = load_any(model_dir, device=device)
            tokenizer = load_tokenizer(model_dir)
            bos_id = bos_token(bos, model.config, tokenizer)
            model_ids = tokenize(tokenizer, text, bos_id)

            def score(prompt_dir: str | None, desc: str) -> float:
                return perplexity_of_ids(model, model_ids, seqlen,
                                         context_of(model, None if prompt_dir is None else tensors[prompt_dir], bos_id),
                                         batch_size=batch_size, max_windows=max_windows, progress=progress,
                                         desc=desc).ppl

            if bare is None:
                bare = cached.put(model_dir, None, score(None, labels[model_dir]))
            for j, prompt_dir in enumerate(prompts):
                if row[j] is not None:
                    continue
                try:
                    for w in check_compatible(prompt_dir, tensors[prompt_dir], metas[prompt_dir],
                                              model_dir, model, tokenizer):
                        log.warning(w)
                except CTPError as exc:
                    row[j] = {"error": str(exc)}  # never cached: the message names this run's files
                    continue
                row[j] = cached.put(model_dir, prompt_dir,
                                    score(prompt_dir, f"{labels[model_dir]} + {prompt_label(prompt_dir)}"))
            del model
        rows.append({"model": model_dir, "label": labels[model_dir], "ppl": bare,
                     "gap_vs_dense": bare / dense_ppl - 1})
        cells.append([c if isinstance(c, dict) else {"ppl": c, "recovered": gap_recovered(dense_ppl, bare, c)}
                      for c in row])
    return {
        "data": source_label(data), "split": split, "seqlen": seqlen, "bos": bos,
        "dense": {"model": dense, "ppl": dense_ppl},
        "models": rows,
        "prompts": [{"prompt": p, "label": prompt_labels[p], "trained_on": metas[p].get("model"),
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
