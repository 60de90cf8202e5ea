"""Loading models and tokenizers, fingerprints, and the architecture adapter table.

The adapter table is the only place that knows where an architecture keeps its decoder layers.
Everything else (embeddings, rotary position embeddings, attention masks) is found at run time:
the calibration loop runs the model's own forward up to the first decoder layer and captures the
keyword arguments that layer receives, so no per-family code is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import is_quantized_dir
from .errors import CTPError
from .runtime import device_map_for, ready_for_device_, require_bnb, resolve_device
from .zoo import resolve_named

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Arch:
    """Where one architecture keeps its list of decoder layers (dotted attribute path)."""

    layers: str


ARCHS: dict[str, Arch] = {
    "llama": Arch("model.layers"),
    "mistral": Arch("model.layers"),
    "qwen2": Arch("model.layers"),
    "qwen3": Arch("model.layers"),
    "gemma": Arch("model.layers"),
    "phi": Arch("model.layers"),
    "phi3": Arch("model.layers"),
    "opt": Arch("model.decoder.layers"),
    "gpt_neox": Arch("gpt_neox.layers"),
}


def arch_of(model: nn.Module) -> Arch:
    """The adapter-table row for ``model``; a CTPError naming the architecture if absent."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise CTPError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, found through the adapter table."""
    obj: Any = model
    for part in arch_of(model).layers.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_model(name: str) -> str:
    """Map a named model (``embedded``, ``smollm2-135m``: :data:`ctp.zoo.NAMED_MODELS`) to its
    local folder, fetching it on first use; pass anything else through."""
    return resolve_named(name) or name


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a damaged or missing checkpoint raises inside transformers / safetensors."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def _why(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _read_config(name: str, trust_remote_code: bool, revision: str | None = None) -> Any:
    from transformers import AutoConfig

    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").exists():
        raise CTPError(f"model folder {name} not found or has no config.json")
    try:
        return AutoConfig.from_pretrained(name, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except OSError as exc:  # not found, no network, no access
        raise CTPError(f"cannot load model {name!r}: {_why(exc)}") from None
    except _load_errors() as exc:
        raise CTPError(f"cannot read the configuration of {name!r}: {_why(exc)}") from None


def check_supported(name: str, trust_remote_code: bool = False) -> Any:
    """Read the model's config and refuse unsupported architectures before loading weights."""
    config = _read_config(resolve_model(name), trust_remote_code)
    if getattr(config, "model_type", None) not in ARCHS:
        raise CTPError(
            f"unsupported architecture {config.model_type!r} in {name}; "
            f"supported: {', '.join(sorted(ARCHS))}"
        )
    return config


def _from_pretrained(name: str, **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except _load_errors() as exc:
        raise CTPError(f"cannot load model {name!r}: {_why(exc)}") from None


def load_model(
    name: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """Load a dense causal LM in ``dtype`` onto ``device``, in eval mode.

    ``name`` is a hub id, a local folder, or a named model. A compressed (bitsandbytes) folder
    is loaded by :func:`load_any` instead.
    """
    name = resolve_model(name)
    check_supported(name, trust_remote_code)
    model = _from_pretrained(name, dtype=dtype, revision=revision,
                             trust_remote_code=trust_remote_code, low_cpu_mem_usage=True)
    return model.to(device).eval()


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None):
    """Load the tokenizer that belongs to ``name`` (hub id, folder, or named model)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(name), revision=revision,
                                             trust_remote_code=trust_remote_code)
    except (*_load_errors(), TypeError) as exc:
        raise CTPError(f"cannot load the tokenizer of {name!r}: {_why(exc)}") from None


def load_any(
    name: str,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a dense model or a compressed ctp checkpoint for inference, on ``device``.

    On the CPU, everything not quantized defaults to float32 (CPU half-precision matmuls are
    slow and coarse). 4-bit layers compute in the dtype of the device they run on, whatever
    machine compressed them (:func:`ctp.runtime.ready_for_device_`), and always use
    bitsandbytes' plain dequantize-and-multiply path on a CPU.
    """
    name = resolve_model(name)
    check_supported(name, trust_remote_code)
    device = resolve_device(device)
    if not is_quantized_dir(name):
        if dtype is None and device.type == "cpu":
            dtype = torch.float32
        return load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    require_bnb(device)
    model = _from_pretrained(name, device_map=device_map_for(device), dtype=dtype or "auto",
                             trust_remote_code=trust_remote_code)
    ready_for_device_(model, device, dtype)
    return model.eval()


load_compressed = load_any


@contextlib.contextmanager
def checkpoint_layers(model: nn.Module) -> Iterator[None]:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    transformers' own gradient checkpointing acts only in training mode, which would also turn
    on dropout in the frozen model (OPT has 0.1); this wraps every decoder layer's forward in a
    non-reentrant checkpoint whatever the mode, and restores it on exit.
    """
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model))
    originals = [(layer.forward, "forward" in vars(layer)) for layer in layers]  # accelerate hooks
    for layer, (forward, _) in zip(layers, originals):
        def wrapped(*args: Any, _forward=forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped
    try:
        yield
    finally:
        for layer, (forward, own) in zip(layers, originals):
            if own:
                layer.forward = forward
            else:
                del layer.forward  # back to the class's method


def weights_fingerprint(model: nn.Module) -> str:
    """A short, dtype-independent hash of a dense model's parameters.

    Hashes each parameter's name, shape and a strided sample of up to 65,536 of its values in
    float32, so it is fast on 70B models and equal for fp16/bf16/fp32 loads of the same weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not torch.is_floating_point(tensor):
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 65536)
        sample = flat[::step][:65536].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id mapping)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
