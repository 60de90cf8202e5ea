"""Perplexity with the GPTQ / SparseGPT / Wanda protocol, optionally behind a soft prompt.

Protocol: tokenize the joined test text once, cut it into ``floor(N / seqlen)`` non-overlapping
windows, score each window as its own sequence, and report
``exp(mean over windows of the window's mean next-token NLL)``.

With a prompt, the same ``n`` virtual tokens stand before every window (after BOS for the families
that need one: :func:`ctp.lm.bos_token`). Their positions are never scored, and exactly the ``seqlen - 1`` targets of each window that are scored
without a prompt are scored with it (see :mod:`ctp.lm`). (Averaging over virtual positions, as
the paper's code does, would report ``ppl ** ((L - 1) / (L + n - 1))`` -- a gain that is not real.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CTPError
from ..lm import PromptCache, window_nlls, windows_of


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement: ``ppl = exp(nll)``."""

    ppl: float
    nll: float  # mean next-token negative log-likelihood, nats
    windows: int
    seqlen: int
    tokens_scored: int
    virtual_tokens: int = 0
    bos: bool = False  # a BOS token stood before every window (context, never scored)


def finite_ppl(nll: float, what: str) -> float:
    """``exp(nll)``, or a CTPError when the model produced NaN or infinity (never a figure)."""
    if not math.isfinite(nll):
        raise CTPError(f"{what}: the model's loss is not finite ({nll}); its weights or the prompt "
                       "are damaged, or the arithmetic overflowed (try --dtype float32)")
    return math.exp(nll)


def perplexity_of_ids(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    prompt: torch.Tensor | PromptCache | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = False,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of 1-D token ``ids`` under the protocol in this module's docstring.

    ``prompt``: what stands before every window -- a :class:`~ctp.lm.PromptCache` (BOS, a
    prompt of either kind, or both), or an input prompt's embeddings ``[n, hidden]``.
    """
    if seqlen < 2:
        raise CTPError(f"seqlen must be at least 2, got {seqlen}")
    windows = windows_of(ids, seqlen, max_windows)
    nll = window_nlls(model, windows, prompt, batch_size, progress, desc).mean().item()
    return PerplexityResult(
        ppl=finite_ppl(nll, desc),
        nll=nll,
        windows=windows.shape[0],
        seqlen=seqlen,
        tokens_scored=windows.shape[0] * (seqlen - 1),
        virtual_tokens=(0 if prompt is None else prompt.num_virtual_tokens
                        if isinstance(prompt, PromptCache) else prompt.shape[0]),
        bos=isinstance(prompt, PromptCache) and prompt.bos,
    )
