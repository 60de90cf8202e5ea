"""``perplexity()`` and ``evaluate()``: the public entry points for measuring a model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import read_prompt_meta
from ..config import EvalConfig
from ..data import load_text, source_label, tokenize
from ..errors import CTPError
from ..lm import bos_token, default_seqlen
from ..models import load_any, load_tokenizer
from ..prompt.kinds import SoftPrompt, context_of, load_prompt
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
    prompt: str | Path | torch.Tensor | SoftPrompt | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: str = "auto",
    progress: bool = False,
    bos: str = "auto",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` (a corpus name or file), GPTQ/Wanda protocol.

    Args:
        model: a loaded causal LM, or a name/folder (dense or ctp-compressed) to load.
        tokenizer: defaults to the model folder's own.
        seqlen: window length; default the model's context (capped at 4096) less what stands
            before the text.
        prompt: a prompt folder (either kind), a :class:`SoftPrompt`, or an input prompt
            ``[n, hidden]``; its positions are never scored.
        bos: the BOS rule (auto, always, never: :func:`ctp.lm.bos_token`).
    """
    if isinstance(model, str):
        loaded = load_any(model, device=device)
        tokenizer = tokenizer or load_tokenizer(model)
        model = loaded
    if tokenizer is None:
        raise CTPError("perplexity needs a tokenizer when given a model object")
    soft = load_prompt(prompt)
    bos_id = bos_token(bos, model.config, tokenizer)
    context = context_of(model, soft, bos_id)
    seqlen = seqlen or default_seqlen(model, 0 if context is None else context.length)
    if max_windows is None:
        max_windows = DEFAULT_MAX_WINDOWS.get(data)
    ids = tokenize(tokenizer, load_text(data, split), bos_id)
    return perplexity_of_ids(model, ids, seqlen, context, batch_size, max_windows,
                             progress, desc=f"ppl {source_label(data)}")


def _details(r: PerplexityResult) -> dict[str, Any]:
    return {"nll": r.nll, "windows": r.windows, "seqlen": r.seqlen,
            "tokens_scored": r.tokens_scored, "virtual_tokens": r.virtual_tokens, "bos": r.bos}


def evaluate(
    model: str | nn.Module,
    config: EvalConfig | None = None,
    prompt: str | Path | torch.Tensor | SoftPrompt | None = None,
    progress: bool = True,
    *,
    tokenizer: Any = None,
    with_and_without: bool = False,
) -> dict[str, Any]:
    """Perplexity of a model (folder, or loaded with its ``tokenizer``), optionally behind a
    prompt (either kind), on each of ``config.ppl``; BOS per ``config.bos``.

    Returns ``{"model", "prompt", "prompt_type", "split", "bos_token_id", "ppl": {name: value},
    "details"}``. With ``with_and_without`` (and a prompt) it also holds
    ``"ppl_without_prompt"``: the bare model (BOS still per the rule) on exactly the same
    windows -- the window length leaves room for the prompt in both, so the two numbers score
    the same targets.
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
    soft = load_prompt(prompt)
    if soft is not None and isinstance(prompt, (str, Path)):  # a folder: stitch's checks
        for warning in check_compatible(str(prompt), soft, read_prompt_meta(prompt), str(name),
                                        model, tokenizer):
            log.warning(warning)
    bos_id = bos_token(config.bos, model.config, tokenizer)
    context = context_of(model, soft, bos_id)
    seqlen = config.seqlen or default_seqlen(model, 0 if context is None else context.length)
    result: dict[str, Any] = {"model": str(name),
                              "prompt": str(prompt) if isinstance(prompt, (str, Path)) else None,
                              "prompt_type": None if soft is None else soft.kind,
                              "split": config.split, "bos_token_id": bos_id, "ppl": {}, "details": {}}
    runs = [("ppl", context)]
    if with_and_without and soft is not None:
        runs.append(("ppl_without_prompt", context_of(model, None, bos_id)))
        result["ppl_without_prompt"] = {}
    for data in config.ppl:
        key = source_label(data)
        ids = tokenize(tokenizer, load_text(data, config.split), bos_id)
        for field, cache in runs:
            r = perplexity_of_ids(model, ids, seqlen, cache, config.batch_size,
                                  config.max_windows or DEFAULT_MAX_WINDOWS.get(data), progress,
                                  desc=f"ppl {key}")
            result[field][key] = r.ppl
            if field == "ppl":
                result["details"][key] = _details(r)
    return result
