"""Token-level language-model math shared by training and evaluation.

Windows of token ids, the model's context, what stands before every window, and next-token
NLLs. Before a window there may be a BOS token (the families that need one: :func:`bos_token`)
and a soft prompt, in that order: BOS, prompt, text. Neither is ever scored, and exactly the
``seqlen - 1`` targets of a window that are scored without them are scored with them: they do not
earn a prediction of the window's first token.

What stands before the text enters every layer as keys and values, a :class:`PromptCache`: for
an input prompt they are computed by running the model over its embeddings (after BOS), for a
key/value prompt they are the prompt itself (after BOS's), and for BOS alone they are BOS's. The
cache is fed as the past of each batch, whose positions start after it exactly as when the same
embeddings are prepended. Scoring and training read it through a *frozen* past (nothing is
appended to it, so recomputing a layer for gradient checkpointing sees the same past), decoding
through a growing one. Losses go through the output head a chunk of tokens at a time
(:mod:`ctp.head`).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import BOS_RULES
from .errors import CTPError
from .head import final_hidden, nll_fn, output_head, per_token_losses


def model_context(model: nn.Module | Any) -> int | None:
    """The maximum sequence length a model (or its config) states, if it states one."""
    config = getattr(model, "config", model)
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
# BOS: one rule
# ---------------------------------------------------------------------------------------------

def family_needs_bos(config: Any) -> bool:
    """Whether the model's family is trained with BOS at the start of every sequence and
    degrades without it: the Gemma families (lm-eval's ``hf`` model adds BOS for any model type
    containing "gemma"; so does ctp). Elsewhere the published GPTQ/Wanda protocol puts no BOS
    at each window, and Llama-family tables assume it."""
    return "gemma" in str(getattr(config, "model_type", "") or "")


def bos_token(rule: str, config: Any, tokenizer: Any = None) -> int | None:
    """The BOS id to put before every window under ``rule`` (None: no BOS).

    ``auto``: BOS for the families that need it (:func:`family_needs_bos`), none elsewhere;
    ``always``; ``never``. The id is the tokenizer's, else the model config's.
    """
    if rule not in BOS_RULES:
        raise CTPError(f"unknown bos rule {rule!r}; choose from {', '.join(BOS_RULES)}")
    if rule == "never" or (rule == "auto" and not family_needs_bos(config)):
        return None
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    if not isinstance(bos, int):
        raise CTPError(f"bos {rule}: the tokenizer and the model config name no BOS token")
    return bos


def strip_bos(ids: list[int], bos: int | None) -> list[int]:
    """``ids`` without a leading BOS (tokenizers that add one): the rule puts it back once."""
    return ids[1:] if bos is not None and ids[:1] == [bos] else ids


# ---------------------------------------------------------------------------------------------
# what stands before the text, as keys and values
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PromptCache:
    """What stands before every window -- BOS, a soft prompt, or both -- as keys and values in
    every layer of one model, for reuse as a past.

    ``keys[i]`` and ``values[i]`` are ``[1, kv_heads, kept, head_dim]`` on layer ``i``'s
    device: ``kept = length`` for full attention, at most ``sliding_window - 1`` for a
    sliding-window layer (all it would keep after reading them). :meth:`frozen` and
    :meth:`past` lend them to a batch as broadcast views (``expand``), so a batch adds no copy
    of its own until the model concatenates its keys after them. Built with gradients enabled
    from tensors that need them (training), the gradient flows back through them.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    num_virtual_tokens: int  # the prompt's positions (0: BOS alone)
    config: Any  # the model's config: which cache layer types to build, and whose cache this is
    bos: bool = False  # a BOS position comes first
    # with BOS: the logits ``[1, 1, vocab]`` at BOS's position (what the model predicts from BOS
    # alone; BOS never sees what follows it, the prompt included)
    bos_logits: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Positions before the text: BOS (if any) plus the prompt."""
        return self.num_virtual_tokens + int(self.bos)

    @property
    def numel(self) -> int:
        """Values held: ``length x layers x 2 x kv_heads x head_dim`` (fewer with sliding windows)."""
        return sum(t.numel() for t in (*self.keys, *self.values))

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def _filled(self, batch_size: int) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for layer, keys, values in zip(cache.layers, self.keys, self.values, strict=True):
            restore_layer(layer, keys.expand(batch_size, -1, -1, -1),
                          values.expand(batch_size, -1, -1, -1), self.length)
        return cache

    def past(self, batch_size: int) -> Any:
        """A fresh ``DynamicCache`` that starts with this context, for ``batch_size`` rows; the
        model appends each step's keys and values to it (decoding)."""
        return self._filled(batch_size)

    def frozen(self, batch_size: int) -> Any:
        """A past that always holds just this context: each layer returns it followed by the
        batch's own keys and values and stores nothing. One forward pass (or its recomputation
        under gradient checkpointing) sees exactly the context, however often it is called."""
        cache = self._filled(batch_size)
        for layer in cache.layers:
            layer.update = types.MethodType(_frozen_update, layer)
        return cache


def _frozen_update(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's ``update`` that returns the stored context followed by the new states
    and keeps nothing (see :meth:`PromptCache.frozen`)."""
    keys = layer.keys.to(key_states.dtype)
    values = layer.values.to(value_states.dtype)
    return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def has_sliding_layers(config: Any) -> bool:
    """Whether any layer of the model attends within a sliding window (its cache keeps only the
    last ``sliding_window - 1`` slots, and its mask counts slots, padding included)."""
    from transformers import DynamicCache

    return any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers)


def check_cache_layer(layer: Any) -> None:
    """Refuse a cache layer type whose state after the context :func:`restore_layer` cannot set:
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


def _embeddings_of(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt ``[n, hidden]`` as the model's input embeddings ``[1, n, hidden]``: cast to
    the embeddings' dtype, except under autocast, where the embeddings are promoted to the
    prompt's (float32) and autocast casts per operation, so a 16-bit model never rounds a
    float32 prompt or its gradient."""
    weight = model.get_input_embeddings().weight
    prompt = prompt.to(weight.device)
    if torch.is_autocast_enabled(weight.device.type):
        return prompt.to(torch.promote_types(prompt.dtype, weight.dtype)).unsqueeze(0)
    return prompt.to(weight.dtype).unsqueeze(0)


def context_cache(model: nn.Module, prompt: torch.Tensor | None = None,
                  bos: int | None = None) -> PromptCache | None:
    """Run ``model`` once over BOS (when ``bos`` is an id) and the input prompt's embeddings
    ``[n, hidden]`` (when given), in that order at positions ``0, 1, ...``, and keep every
    layer's keys and values (None when there is neither).

    Gradients flow back to ``prompt`` when it requires them and grad mode is on (training);
    evaluation calls it under ``no_grad``. Under an enabled autocast the cache is computed
    under it, like what follows it.
    """
    from transformers import DynamicCache

    if prompt is None and bos is None:
        return None
    if prompt is not None:
        check_prompt_fits(model, 0, prompt)
    device = input_device(model)
    parts = []
    if bos is not None:
        parts.append(model.get_input_embeddings()(torch.tensor([[bos]], device=device)))
    if prompt is not None:
        parts.append(_embeddings_of(model, prompt))
    if len(parts) == 2:
        parts[0] = parts[0].to(parts[1].dtype)
    embeds = torch.cat(parts, dim=1)
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        check_cache_layer(layer)
    positions = torch.arange(embeds.shape[1], device=device).unsqueeze(0)
    keep = torch.tensor([0], device=device) if bos is not None else 1  # BOS's own logits
    out = model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=keep)
    # clones: a sliding-window layer's keys are a view of all of them, and only what it keeps is held
    return PromptCache(keys=tuple(layer.keys.clone() for layer in cache.layers),
                       values=tuple(layer.values.clone() for layer in cache.layers),
                       num_virtual_tokens=0 if prompt is None else prompt.shape[0],
                       config=model.config, bos=bos is not None,
                       bos_logits=out.logits.detach() if bos is not None else None)


def cache_of_keys_values(model: nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor],
                         bos: int | None = None) -> PromptCache:
    """A key/value prompt as a :class:`PromptCache`: BOS's own keys and values (computed by the
    model, no gradient) and then ``keys[i]``/``values[i]`` ``[kv_heads, n, head_dim]`` in layer
    ``i``, used as they are (gradients flow to them when they require them).

    Keys are stored after rotary embedding, as the model stores its own: a learned key carries
    whatever position it learned; the text's positions start after BOS and the ``n`` prompt
    positions, exactly as with an input prompt of ``n`` tokens.
    """
    from transformers import DynamicCache

    n = keys[0].shape[1]
    layers = DynamicCache(config=model.config).layers
    if len(keys) != len(layers) or len(values) != len(layers):
        raise CTPError(f"the key/value prompt has {len(keys)} layers, the model {len(layers)}")
    with torch.no_grad():
        head = context_cache(model, None, bos)
    out_keys, out_values = [], []
    for i, layer in enumerate(layers):
        check_cache_layer(layer)
        device = head.keys[i].device if head is not None else input_device(model)
        k, v = keys[i].to(device).unsqueeze(0), values[i].to(device).unsqueeze(0)
        if head is not None:
            k = torch.cat([head.keys[i].to(k.dtype), k], dim=-2)
            v = torch.cat([head.values[i].to(v.dtype), v], dim=-2)
        window = getattr(layer, "sliding_window", None)
        if window is not None:  # what a sliding-window layer keeps after reading them all
            k, v = k[:, :, -window + 1:], v[:, :, -window + 1:]
        out_keys.append(k)
        out_values.append(v)
    return PromptCache(keys=tuple(out_keys), values=tuple(out_values), num_virtual_tokens=n,
                       config=model.config, bos=bos is not None,
                       bos_logits=None if head is None else head.bos_logits)


@torch.no_grad()
def build_prompt_cache(model: nn.Module, prompt: torch.Tensor | None,
                       bos: int | None = None) -> PromptCache | None:
    """:func:`context_cache` without gradients: an input prompt ``[n, hidden]`` (and BOS) once,
    for evaluation and generation."""
    return context_cache(model, prompt, bos)


def check_prompt_fits(model: nn.Module, seqlen: int, prompt: torch.Tensor | PromptCache | None) -> None:
    """Refuse a window plus what stands before it longer than the model's context, a prompt of
    the wrong width, or a prompt cache built for another model."""
    if isinstance(prompt, PromptCache):
        n = prompt.length
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


def _as_cache(model: nn.Module, prompt: torch.Tensor | PromptCache | None) -> PromptCache | None:
    """A cache for a prompt given as embeddings ``[n, hidden]`` (built here, with gradients
    when it needs them), or the cache given."""
    if isinstance(prompt, torch.Tensor):
        return context_cache(model, prompt)
    return prompt


def prompted_logits(
    model: nn.Module,
    ids: torch.Tensor,
    prompt_cache: PromptCache | None = None,
    attention_mask: torch.Tensor | None = None,
    past: Any = None,
    logits_to_keep: int = 0,
) -> tuple[torch.Tensor, Any]:
    """Logits of real tokens read after the cached context (BOS and/or prompt).

    Exactly what the model computes with the context's embeddings prepended: the tokens'
    positions start after it (rotary angles, OPT's learned positions, partial rotary alike) and
    attention covers the context and the tokens, never padding.

    Args:
        ids: LongTensor ``[batch, T]``: the tokens, or the next ones when ``past`` is given.
        prompt_cache: the context; None scores the bare model (through a fresh cache).
        attention_mask: ``[batch, real tokens so far + T]``, 0 at (left) padding; None: no padding.
        past: the cache a previous call returned, to continue from it (decoding); None starts
            right after the context.
        logits_to_keep: 0 keeps every position; ``k`` only the last ``k``.
    Returns:
        logits ``[batch, T or k, vocab]``, and the cache to continue from (grown by ``T``).
    """
    from transformers import DynamicCache

    batch, length = ids.shape
    n = 0 if prompt_cache is None else prompt_cache.length
    if past is None:
        if prompt_cache is None:
            past = DynamicCache(config=model.config)
        else:
            check_prompt_fits(model, 0, prompt_cache)
            past = prompt_cache.past(batch)
    positions, full_mask = _positions(ids, n, past, attention_mask)
    out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=past,
                use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits, past


def _positions(ids: torch.Tensor, n: int, past: Any,
               attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids of ``ids`` after ``past`` and the mask over context + tokens."""
    batch, length = ids.shape
    if attention_mask is None:
        start = past.get_seq_length()
        return torch.arange(start, start + length, device=ids.device).unsqueeze(0), None
    # padding takes no position: a padded row computes what it would alone
    positions = n + (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return positions, torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)


def hidden_states(model: nn.Module, ids: torch.Tensor,
                  context: torch.Tensor | PromptCache | None = None) -> torch.Tensor:
    """What the output head receives for each token of ``ids`` ``[batch, T]`` read after
    ``context`` (a :class:`PromptCache`, an input prompt ``[n, hidden]``, or nothing):
    ``[batch, T, hidden]``, differentiable with respect to whatever the context was built from."""
    cache = _as_cache(model, context)
    if cache is None:
        return final_hidden(model, input_ids=ids, use_cache=False)
    check_prompt_fits(model, ids.shape[1], cache)
    past = cache.frozen(ids.shape[0])
    start = cache.length
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    return final_hidden(model, input_ids=ids, position_ids=positions, cache=past, use_cache=True)


def token_nlls(model: nn.Module, ids: torch.Tensor,
               context: torch.Tensor | PromptCache | None = None) -> torch.Tensor:
    """Next-token NLL of every scored target: float32 ``[batch, seqlen - 1]``.

    Position ``t`` of the result is the NLL of ``ids[:, t + 1]``, read after ``context`` (see
    :func:`hidden_states`): exactly the same targets are scored with or without one. The output
    head runs a chunk of tokens at a time (:mod:`ctp.head`); gradients flow to the context's
    tensors when they require them: this is the training path.
    """
    hidden = hidden_states(model, ids, context)[:, :-1]
    head = output_head(model)
    flat = hidden.reshape(-1, hidden.shape[-1])
    losses = per_token_losses(flat, nll_fn(head, ids[:, 1:].reshape(-1)), head.chunk_tokens())
    return losses.view(ids.shape[0], -1)


@torch.no_grad()
def window_nlls(
    model: nn.Module,
    windows: torch.Tensor,
    prompt: torch.Tensor | PromptCache | None = None,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "perplexity",
) -> torch.Tensor:
    """Mean next-token NLL of each window (float64 ``[windows]``), context positions unscored.

    Args:
        model: a causal LM (dense or 4-bit).
        windows: LongTensor ``[count, seqlen]``.
        prompt: what stands before every window: a :class:`PromptCache` of this model (BOS,
            prompt or both), or an input prompt ``[n, hidden]`` (its cache is built once, here).
    """
    from tqdm.auto import tqdm

    device = input_device(model)
    check_prompt_fits(model, windows.shape[1], prompt)
    cache = build_prompt_cache(model, prompt) if isinstance(prompt, torch.Tensor) else prompt
    out = []
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        ids = windows[start : start + batch_size].to(device)
        out.append(token_nlls(model, ids, cache).mean(dim=1).double().cpu())
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
