"""``perplexity()`` and ``evaluate()``: the public entry points for measuring a model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import EvalConfig
from ..data import load_text, source_label, tokenize
from ..errors import CTPError
from ..models import load_any, load_tokenizer
from ..prompt.artifact import load_prompt_embeddings
from .perplexity import PerplexityResult, default_seqlen, perplexity_of_ids

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
    device: str = "cpu",
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


def evaluate(
    model: str,
    config: EvalConfig | None = None,
    prompt: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a model folder (dense or compressed), optionally with a prompt, on each of
    ``config.ppl``. Returns ``{"model", "prompt", "split", "ppl": {name: value}, "details"}``."""
    from ..compress.pipeline import resolve_device

    config = config or EvalConfig()
    device = resolve_device(config.device)
    loaded = load_any(model, device=device, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    embeddings = load_prompt_embeddings(prompt)
    result: dict[str, Any] = {"model": str(model), "prompt": None if prompt is None else str(prompt),
                              "split": config.split, "ppl": {}, "details": {}}
    for data in config.ppl:
        r = perplexity(loaded, tokenizer, data, config.split, config.seqlen, embeddings,
                       config.batch_size, config.max_windows, progress=progress)
        key = source_label(data)
        result["ppl"][key] = r.ppl
        result["details"][key] = {"nll": r.nll, "windows": r.windows, "seqlen": r.seqlen,
                                  "tokens_scored": r.tokens_scored, "virtual_tokens": r.virtual_tokens}
    return result
