"""Token-level language-model math shared by training and evaluation.

Windows of token ids, the model's context, and next-token NLLs with or without a soft prompt.
With a prompt, its ``n`` virtual embeddings come before every window; their positions are never
scored, and exactly the ``seqlen - 1`` targets of a window that are scored without a prompt are
scored with it: the prompt does not earn a prediction of the window's first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CTPError


def model_context(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config, if it states one."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seqlen(model: nn.Module, virtual_tokens: int = 0, cap: int = 4096) -> int:
    """The window length the published tables use: the model's context (capped), less the prompt."""
    context = model_context(model) or 2048
    return min(context, cap) - virtual_tokens


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input embeddings live (where token ids must go)."""
    return model.get_input_embeddings().weight.device


def windows_of(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut 1-D ``ids`` into ``[floor(N / seqlen), seqlen]`` non-overlapping windows."""
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise CTPError(f"the text has {ids.numel()} tokens, too short for one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def spread_windows(ids: torch.Tensor, seqlen: int, count: int | None) -> torch.Tensor:
    """At most ``count`` of the non-overlapping windows of ``ids``, spread evenly over the text
    (the first N windows of a corpus are rarely representative)."""
    windows = windows_of(ids, seqlen)
    if count is None or count >= windows.shape[0]:
        return windows
    return windows[torch.linspace(0, windows.shape[0] - 1, count).round().long()]


def check_prompt_fits(model: nn.Module, seqlen: int, prompt: torch.Tensor | None) -> None:
    """Refuse a window plus prompt longer than the model's context, or a prompt of the wrong width."""
    n = 0 if prompt is None else prompt.shape[0]
    context = model_context(model)
    if context is not None and seqlen + n > context:
        raise CTPError(
            f"window of {seqlen} tokens plus {n} virtual tokens exceeds the model's "
            f"context of {context}"
        )
    width = model.get_input_embeddings().weight.shape[1]
    if prompt is not None and prompt.shape[-1] != width:
        raise CTPError(f"prompt hidden size {prompt.shape[-1]} differs from the model's {width}")


def token_nlls(model: nn.Module, ids: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL of every scored target: float32 ``[batch, seqlen - 1]``.

    Position ``t`` of the result is the NLL of ``ids[:, t + 1]``. With a prompt ``[n, hidden]``
    the virtual embeddings are prepended and their ``n`` output positions dropped, so exactly the
    same targets are scored as without one. Without autocast the prompt is cast to the
    embeddings' dtype; under autocast the embeddings are promoted to the prompt's (float32), so a
    16-bit model never rounds the prompt or its gradient. Gradients flow to
    ``prompt`` when it requires them; this one function serves both training and evaluation.
    """
    if prompt is None:
        logits = model(input_ids=ids, use_cache=False).logits
    else:
        tok = model.get_input_embeddings()(ids)
        if torch.is_autocast_enabled(tok.device.type):
            # mixed precision: the prompt stays float32 and autocast casts per operation, so its
            # gradient never flows through a 16-bit copy of itself
            tok = tok.to(torch.promote_types(prompt.dtype, tok.dtype))
        virt = prompt.to(dtype=tok.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
        logits = model(inputs_embeds=torch.cat([virt, tok], dim=1), use_cache=False).logits
        logits = logits[:, prompt.shape[0]:]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)


@torch.no_grad()
def window_nlls(
    model: nn.Module,
    windows: torch.Tensor,
    prompt: torch.Tensor | None = None,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "perplexity",
) -> torch.Tensor:
    """Mean next-token NLL of each window (float64 ``[windows]``), prompt positions unscored.

    Args:
        model: a causal LM (dense or 4-bit) whose ``forward`` accepts ``inputs_embeds``.
        windows: LongTensor ``[count, seqlen]``.
        prompt: optional soft prompt ``[n, hidden]``, prepended to every window.
    """
    from tqdm.auto import tqdm

    device = input_device(model)
    check_prompt_fits(model, windows.shape[1], prompt)
    if prompt is not None:
        prompt = prompt.to(device)
    out = []
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        ids = windows[start : start + batch_size].to(device)
        out.append(token_nlls(model, ids, prompt).mean(dim=1).double().cpu())
    return torch.cat(out)
