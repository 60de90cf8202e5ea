"""``perplexity()`` and ``evaluate()``: the public entry points for measuring a model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import load_prompt_embeddings, read_prompt_meta
from ..config import EvalConfig
from ..data import load_text, source_label, tokenize
from ..errors import CTPError
from ..lm import default_seqlen
from ..models import load_any, load_tokenizer
from ..prompt.stitch import check_compatible
from ..runtime import resolve_device
from .perplexity import PerplexityResult, perplexity_of_ids

log = logging.getLogger(__name__)

# SparseGPT scores C4 on its first 256 windows only; do the same so numbers compare.
DEFAULT_MAX_WINDOWS = {"c4": 256}


def perplexity(
    model: str | nn.Module,
    tokenizer: Any = None,
    data: str = "wikitext2",
    split: str = "test",
    seqlen: int | None = None,
    prompt: str | Path | torch.Tensor | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: str = "auto",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` (a corpus name or file), GPTQ/Wanda protocol.

    Args:
        model: a loaded causal LM, or a name/folder (dense or ctp-compressed) to load.
        tokenizer: defaults to the model folder's own.
        seqlen: window length; default the model's context (capped at 4096) less the prompt.
        prompt: soft prompt ``[n, hidden]`` or a prompt folder; its positions are never scored.
    """
    if isinstance(model, str):
        loaded = load_any(model, device=device)
        tokenizer = tokenizer or load_tokenizer(model)
        model = loaded
    if tokenizer is None:
        raise CTPError("perplexity needs a tokenizer when given a model object")
    embeddings = load_prompt_embeddings(prompt)
    n = 0 if embeddings is None else embeddings.shape[0]
    seqlen = seqlen or default_seqlen(model, n)
    if max_windows is None:
        max_windows = DEFAULT_MAX_WINDOWS.get(data)
    ids = tokenize(tokenizer, load_text(data, split))
    return perplexity_of_ids(model, ids, seqlen, embeddings, batch_size, max_windows,
                             progress, desc=f"ppl {source_label(data)}")


def _details(r: PerplexityResult) -> dict[str, Any]:
    return {"nll": r.nll, "windows": r.windows, "seqlen": r.seqlen,
            "tokens_scored": r.tokens_scored, "virtual_tokens": r.virtual_tokens}


def evaluate(
    model: str | nn.Module,
    config: EvalConfig | None = None,
    prompt: str | Path | torch.Tensor | None = None,
    progress: bool = True,
    *,
    tokenizer: Any = None,
    with_and_without: bool = False,
) -> dict[str, Any]:
    """Perplexity of a model (folder, or loaded with its ``tokenizer``), optionally behind a
    prompt, on each of ``config.ppl``.

    Returns ``{"model", "prompt", "split", "ppl": {name: value}, "details"}``. With
    ``with_and_without`` (and a prompt) it also holds ``"ppl_without_prompt"``: the bare model on
    exactly the same windows -- the window length leaves room for the prompt in both, so the
    two numbers score the same targets.
    """
    config = config or EvalConfig()
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
    if isinstance(model, str):
        loaded = load_any(model, device=resolve_device(config.device),
                          trust_remote_code=config.trust_remote_code)
        tokenizer = load_tokenizer(model, config.trust_remote_code)
        model = loaded
    elif tokenizer is None:
        raise CTPError("evaluate needs the tokenizer of a loaded model")
    embeddings = load_prompt_embeddings(prompt)
    if embeddings is not None and not isinstance(prompt, torch.Tensor):  # a folder: stitch's checks
        for warning in check_compatible(str(prompt), embeddings, read_prompt_meta(prompt), str(name),
                                        model, tokenizer):
            log.warning(warning)
    n = 0 if embeddings is None else embeddings.shape[0]
    seqlen = config.seqlen or default_seqlen(model, n)
    result: dict[str, Any] = {"model": str(name),
                              "prompt": None if prompt is None or isinstance(prompt, torch.Tensor) else str(prompt),
                              "split": config.split, "ppl": {}, "details": {}}
    runs = [("ppl", embeddings)]
    if with_and_without and embeddings is not None:
        runs.append(("ppl_without_prompt", None))
        result["ppl_without_prompt"] = {}
    for data in config.ppl:
        key = source_label(data)
        for field, tensor in runs:
            r = perplexity(model, tokenizer, data, config.split, seqlen, tensor, config.batch_size,
                           config.max_windows, progress=progress)
            result[field][key] = r.ppl
            if field == "ppl":
                result["details"][key] = _details(r)
    return result
