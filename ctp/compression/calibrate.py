"""The layer-by-layer calibration loop: capture inputs, run one decoder layer at a time.

Only one layer's calibration activations (its inputs and outputs, ``2 x [nsamples, seqlen,
hidden]``) are alive at once. When the work device differs from where the model lives (model on
CPU, ``device="cuda"``), each decoder layer is moved to the device for its turn and back after,
so GPU memory holds one layer plus activations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import decoder_layers


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first decoder layer."""


def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor inside nested tuples / lists / dicts to ``device`` (floating ones also
    to ``dtype`` when given)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def cast_parameters_(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast ``module``'s plain floating parameters in place to ``dtype`` and return the tensors
    they held, by name (for :func:`restore_parameters_`). Buffers and quantized parameters
    (bitsandbytes' own types) are left as they are."""
    held = {}
    for name, param in module.named_parameters():
        if type(param) is not nn.Parameter or not param.is_floating_point() or param.dtype == dtype:
            continue
        held[name] = param.data
        param.data = param.data.to(dtype)
    return held


def release_freed_memory() -> None:
    """Hand the memory freed by the layer just finished back to the operating system. glibc's
    allocator otherwise keeps it in its heaps, and the resident size of a CPU compression grows
    layer after layer by what the last layer's temporaries left behind (measured: +0.6 GB over 12
    layers of a 220M model). No-op where the C library has no ``malloc_trim``."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def restore_parameters_(module: nn.Module, held: dict[str, torch.Tensor]) -> None:
    """Write each parameter :func:`cast_parameters_` cast back into the very tensor it held
    before (rounded to that tensor's dtype), and hold that tensor again: no new allocation per
    layer (the memory saving itself comes from :func:`release_freed_memory`). Parameters
    replaced since (a Linear swapped for a quantized one) are skipped."""
    for name, param in module.named_parameters():
        old = held.get(name)
        if old is None or type(param) is not nn.Parameter:
            continue
        old.copy_(param.data)
        param.data = old


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, ids: torch.Tensor, device: torch.device, progress: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the model up to its first decoder layer on each window and keep what that layer gets.

    The model's own forward computes embeddings, rotary position embeddings and the attention
    mask, so this works for every decoder-only family.

    Args:
        ids: calibration token ids ``[nsamples, seqlen]``.
        dtype: the work dtype: the embeddings' output is cast to it, so what the model computes
            from it before the first layer (rotary tables, masks, Gemma's scaling) is computed in
            it, as if the model were held in that dtype (None: the model's own).
    Returns:
        hidden states ``[nsamples, seqlen, hidden]`` on ``device`` and the layer's keyword
        arguments (same for every window: equal lengths, no padding), on ``device``.
    """
    first = decoder_layers(model)[0]
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen["hidden"] = hidden
        seen["kwargs"] = kwargs
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    embed = model.get_input_embeddings()
    cast = (embed.register_forward_hook(lambda module, args, out: out.to(dtype))
            if dtype is not None else None)
    embed_device = embed.weight.device
    hidden_states = None
    kwargs: dict[str, Any] = {}
    try:
        for i in tqdm(range(ids.shape[0]), desc="capturing calibration inputs", disable=not progress):
            try:
                model(input_ids=ids[i : i + 1].to(embed_device), use_cache=False)
            except _Captured:
                pass
            hidden = seen["hidden"]
            if hidden_states is None:
                hidden_states = torch.empty(
                    (ids.shape[0], *hidden.shape[1:]), dtype=hidden.dtype, device=device
                )
                kwargs = to_device(seen["kwargs"], device, dtype)
            hidden_states[i] = hidden[0].to(device)
    finally:
        handle.remove()
        if cast is not None:
            cast.remove()
    kwargs.pop("use_cache", None)
    return hidden_states, kwargs


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden-state output, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: torch.Tensor,
    kwargs: dict[str, Any],
    batch_size: int,
    outputs: torch.Tensor | None = None,
) -> None:
    """Run ``inputs`` ``[nsamples, seqlen, hidden]`` through ``layer`` in batches.

    The captured keyword arguments have batch dimension 1 and broadcast over a batch. Outputs are
    written into ``outputs`` when given (hooks on the layer see every batch either way).
    """
    for start in range(0, inputs.shape[0], batch_size):
        out = layer_output(layer(inputs[start : start + batch_size], **kwargs))
        if outputs is not None:
            outputs[start : start + batch_size] = out


def layer_by_layer(
    model: nn.Module,
    ids: torch.Tensor | None,
    device: torch.device,
    process: Callable[[int, nn.Module, Callable[[], None] | None], None],
    batch_size: int = 8,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    """Sequential compression: for each decoder layer, call ``process(index, layer, run)``.

    The layer is on ``device`` during the call, its parameters in the work ``dtype`` (None: as
    held); afterwards its unquantized parameters return to the dtype the model holds them in, so
    the model stays in its stored dtype and only one layer at a time is ever in the work dtype
    (a 7B fp16 checkpoint compressed on a CPU never exists in float32 whole). ``run()`` feeds every calibration window through
    the layer (so forward hooks ``process`` registers see them all). After ``process`` returns
    (having, e.g., pruned and quantized the layer), the layer is run again to produce the next
    layer's inputs: layer ``i`` is calibrated on the outputs of the already-processed layers
    ``< i``. Without calibration ``ids``, ``run`` is None and layers are only moved and processed.
    """
    layers = decoder_layers(model)
    inputs = outputs = None
    if ids is not None:
        inputs, kwargs = capture_layer_inputs(model, ids, device, progress, dtype)
        outputs = torch.empty_like(inputs)
    for index in tqdm(range(len(layers)), desc="layers", disable=not progress):
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        held = cast_parameters_(layer, dtype) if dtype is not None else None
        if inputs is None:
            process(index, layer, None)
        else:
            process(index, layer, lambda x=inputs, m=layer: run_layer(m, x, kwargs, batch_size))
            run_layer(layer, inputs, kwargs, batch_size, outputs)
            inputs, outputs = outputs, inputs
        if held is not None:
            restore_parameters_(layer, held)
        layer.to(home)
        release_freed_memory()
