"""Token-level language-model math shared by training and evaluation.

Windows of token ids, the model's context, and next-token NLLs with or without a soft prompt.
With a prompt, its ``n`` virtual embeddings come before every window; their positions are never
scored, and exactly the ``seqlen - 1`` targets of a window that are scored without a prompt are
scored with it: the prompt does not earn a prediction of the window's first token.

Two ways to put the prompt in front. Training prepends its embeddings (:func:`token_nlls`), so
the gradient reaches them. Everything else uses a :class:`PromptCache`: the prompt's keys and
values in every layer depend only on the prompt and the model, so they are computed once and fed
as the past of each batch, whose positions start at ``n`` exactly as when the prompt is prepended
(:func:`prompted_logits`). Evaluation then costs what it costs without a prompt, plus attention to
``n`` more keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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


# ---------------------------------------------------------------------------------------------
# the prompt's keys and values, computed once
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PromptCache:
    """A soft prompt's keys and values in every layer of one model, for reuse as a past.

    ``keys[i]`` and ``values[i]`` are ``[1, kv_heads, kept, head_dim]`` in the model's dtype on
    layer ``i``'s device: ``kept = n`` for full attention, at most ``sliding_window - 1`` for a
    sliding-window layer (all it would keep after reading the prompt). That is
    ``n x layers x 2 x kv_heads x head_dim`` values held once; :meth:`past` lends them to a batch
    as broadcast views (``expand``), so a batch adds no copy of its own until the model
    concatenates its keys after them, which it does with or without a prompt.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    num_virtual_tokens: int
    config: Any  # the model's config: which cache layer types to build, and whose cache this is

    @property
    def numel(self) -> int:
        """Values held: ``n x layers x 2 x kv_heads x head_dim`` (fewer with sliding windows)."""
        return sum(t.numel() for t in (*self.keys, *self.values))

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def past(self, batch_size: int) -> Any:
        """A fresh ``DynamicCache`` that starts with the prompt, for ``batch_size`` rows.

        Fresh on every call: the model appends each batch's keys and values to it.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for layer, keys, values in zip(cache.layers, self.keys, self.values, strict=True):
            restore_layer(layer, keys.expand(batch_size, -1, -1, -1),
                          values.expand(batch_size, -1, -1, -1), self.num_virtual_tokens)
        return cache


def check_cache_layer(layer: Any) -> None:
    """Refuse a cache layer type whose state after the prompt :func:`restore_layer` cannot set:
    only transformers' dynamic full-attention and sliding-window layers are known."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise CTPError(f"the prompt cache does not support {type(layer).__name__} cache layers")


def restore_layer(layer: Any, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
    """Put ``keys``/``values`` (``[batch, kv_heads, kept, head_dim]``) into an empty cache layer
    as the state it has after reading ``seen`` tokens, without copying them."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    check_cache_layer(layer)
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = seen  # it keeps at most sliding_window - 1, but saw them all


@torch.no_grad()
def build_prompt_cache(model: nn.Module, prompt: torch.Tensor) -> PromptCache:
    """Run ``model`` once over the prompt ``[n, hidden]`` and keep every layer's keys and values.

    No gradient; the prompt is cast to the embeddings' dtype and device, as :func:`token_nlls`
    does without autocast (under an enabled autocast the cache is computed under it, like what
    follows it). Positions are ``0 .. n - 1``, as when the prompt is prepended.
    """
    from transformers import DynamicCache

    check_prompt_fits(model, 0, prompt)
    weight = model.get_input_embeddings().weight
    embeds = prompt.detach().to(device=weight.device, dtype=weight.dtype).unsqueeze(0)
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        check_cache_layer(layer)
    positions = torch.arange(prompt.shape[0], device=weight.device).unsqueeze(0)
    model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    # clones: a sliding-window layer's keys are a view of all n, and only what it keeps is held
    return PromptCache(keys=tuple(layer.keys.clone() for layer in cache.layers),
                       values=tuple(layer.values.clone() for layer in cache.layers),
                       num_virtual_tokens=prompt.shape[0], config=model.config)


def check_prompt_fits(model: nn.Module, seqlen: int, prompt: torch.Tensor | PromptCache | None) -> None:
    """Refuse a window plus prompt longer than the model's context, a prompt of the wrong width,
    or a prompt cache built for another model."""
    if isinstance(prompt, PromptCache):
        n = prompt.num_virtual_tokens
        if prompt.config is not model.config:
            raise CTPError("this prompt cache was built for another model")
    else:
        n = 0 if prompt is None else prompt.shape[0]
    context = model_context(model)
    if context is not None and seqlen + n > context:
        raise CTPError(
            f"window of {seqlen} tokens plus {n} virtual tokens exceeds the model's "
            f"context of {context}"
        )
    width = model.get_input_embeddings().weight.shape[1]
    if isinstance(prompt, torch.Tensor) and prompt.shape[-1] != width:
        raise CTPError(f"prompt hidden size {prompt.shape[-1]} differs from the model's {width}")


def prompted_logits(
    model: nn.Module,
    ids: torch.Tensor,
    prompt_cache: PromptCache | None = None,
    attention_mask: torch.Tensor | None = None,
    past: Any = None,
    logits_to_keep: int = 0,
) -> tuple[torch.Tensor, Any]:
    """Logits of real tokens read after the prompt's cached keys and values.

    Exactly what the model computes with the prompt's embeddings prepended: the tokens' positions
    start at ``n`` (rotary angles, OPT's learned positions, partial rotary alike) and attention
    covers the prompt and the tokens, never padding.

    Args:
        ids: LongTensor ``[batch, T]``: the tokens, or the next ones when ``past`` is given.
        prompt_cache: the prompt; None scores the bare model (through a fresh cache).
        attention_mask: ``[batch, real tokens so far + T]``, 0 at (left) padding; None: no padding.
        past: the cache a previous call returned, to continue from it (decoding); None starts
            right after the prompt.
        logits_to_keep: 0 keeps every position; ``k`` only the last ``k``.
    Returns:
        logits ``[batch, T or k, vocab]``, and the cache to continue from (grown by ``T``).
    """
    from transformers import DynamicCache

    batch, length = ids.shape
    n = 0 if prompt_cache is None else prompt_cache.num_virtual_tokens
    if past is None:
        if prompt_cache is None:
            past = DynamicCache(config=model.config)
        else:
            check_prompt_fits(model, 0, prompt_cache)
            past = prompt_cache.past(batch)
    if attention_mask is None:
        start = past.get_seq_length()
        positions = torch.arange(start, start + length, device=ids.device).unsqueeze(0)
        full_mask = None
    else:  # padding takes no position: a padded row computes what it would alone
        positions = n + (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -length:]
        full_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=past,
                use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits, past


def next_token_nlls(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Float32 NLL ``[batch, T - 1]`` of ``ids[:, t + 1]`` under ``logits[:, t]`` (``[batch, T, vocab]``)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)


def token_nlls(model: nn.Module, ids: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL of every scored target: float32 ``[batch, seqlen - 1]``.

    Position ``t`` of the result is the NLL of ``ids[:, t + 1]``. With a prompt ``[n, hidden]``
    the virtual embeddings are prepended and their ``n`` output positions dropped, so exactly the
    same targets are scored as without one. Without autocast the prompt is cast to the
    embeddings' dtype; under autocast the embeddings are promoted to the prompt's (float32), so a
    16-bit model never rounds the prompt or its gradient. Gradients flow to ``prompt`` when it
    requires them: this is the training path (evaluation uses the cache, :func:`window_nlls`).
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
    return next_token_nlls(logits, ids)


@torch.no_grad()
def window_nlls(
    model: nn.Module,
    windows: torch.Tensor,
    prompt: torch.Tensor | PromptCache | None = None,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "perplexity",
) -> torch.Tensor:
    """Mean next-token NLL of each window (float64 ``[windows]``), prompt positions unscored.

    Args:
        model: a causal LM (dense or 4-bit).
        windows: LongTensor ``[count, seqlen]``.
        prompt: optional soft prompt ``[n, hidden]`` (its cache is built once, here) or a
            :class:`PromptCache` of this model; either stands before every window.
    """
    from tqdm.auto import tqdm

    device = input_device(model)
    check_prompt_fits(model, windows.shape[1], prompt)
    cache = build_prompt_cache(model, prompt) if isinstance(prompt, torch.Tensor) else prompt
    out = []
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        ids = windows[start : start + batch_size].to(device)
        if cache is None:
            logits = model(input_ids=ids, use_cache=False).logits
        else:
            logits, _ = prompted_logits(model, ids, cache)
        out.append(next_token_nlls(logits, ids).mean(dim=1).double().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


def token_picker(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """How the next token is chosen from float logits ``[batch, vocab]`` -> ids ``[batch]``.

    Temperature 0: the argmax (greedy). Otherwise a sample from ``softmax(logits / temperature)``
    restricted to the ``top_k`` likeliest tokens (0: all) and to the smallest set of likeliest
    tokens whose probability reaches ``top_p``, drawn with ``generator`` (None: torch's global one).
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise CTPError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, "
                       f"{top_p}, {top_k}")
    if temperature == 0:
        return lambda logits: logits.argmax(dim=-1)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, dim=-1)
        ranked, order = probs.sort(dim=-1, descending=True)
        drop = ranked.cumsum(dim=-1) - ranked >= top_p  # the mass before it already reaches top_p
        if top_k:
            drop[:, top_k:] = True
        ranked = ranked.masked_fill(drop, 0.0)
        choice = torch.multinomial(ranked, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)

    return sample


def stop_token_ids(model: nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a generation: the tokenizer's EOS and the model's generation config's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])}
    return tuple(sorted(i for i in ids if i is not None))


@torch.no_grad()
def decode(
    model: nn.Module,
    ids: torch.Tensor,
    prompt_cache: PromptCache | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
) -> Iterator[torch.Tensor]:
    """Continue ``ids`` ``[batch, T]`` (left-padded where ``attention_mask`` is 0) after the
    prompt, yielding the next token of every row, ``[batch]``, one step at a time.

    The prompt is read from its cache, each step from the growing cache of the previous ones.
    A row that has produced one of ``eos_ids`` yields ``pad_id`` from then on; decoding ends
    when every row has, or after ``max_new_tokens`` steps, or when the caller stops iterating.
    ``pick`` chooses from float32 logits ``[batch, vocab]`` (default greedy; :func:`token_picker`).
    """
    pick = pick or token_picker()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=ids.device)
    past, step_ids, mask = None, ids, attention_mask
    for _ in range(max_new_tokens):
        logits, past = prompted_logits(model, step_ids, prompt_cache, mask, past, logits_to_keep=1)
        chosen = pick(logits[:, -1].float()).to(ids.device)
        chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
        finished |= torch.isin(chosen, eos)
        yield chosen
        if bool(finished.all()):
            return
        step_ids = chosen.unsqueeze(1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
