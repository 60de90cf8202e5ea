"""Loading models and tokenizers, fingerprints, and finding a model's decoder layers.

Nothing here is listed per architecture. The decoder layers are found from the model itself: the
``nn.ModuleList`` whose elements are all of a class the model names in ``_no_split_modules``
(the blocks transformers' own device maps keep whole). Everything else a layer needs (embeddings,
rotary position embeddings, attention masks) is captured at run time: the calibration loop runs
the model's own forward up to the first decoder layer and keeps the keyword arguments that layer
receives. What ctp cannot handle -- encoder-decoders, mixture-of-experts layers, a model whose
layers cannot be found -- is refused from its configuration, before any weight is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import is_quantized_dir
from .errors import CTPError
from .runtime import device_map_for, ready_for_device_, require_bnb, resolve_device
from .zoo import resolve_named

log = logging.getLogger(__name__)

# Config fields that announce mixture-of-experts layers: their experts are not nn.Linear modules
# (transformers 5 fuses them into 3-D weights), so pruning would silently skip most weights.
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(dotted name, ModuleList)`` of the model's decoder layers, or None when there is no
    single list of blocks of a class named in ``model._no_split_modules``."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module)
             and all(type(m).__name__ in blocks for m in module)]
    return found[0] if len(found) == 1 else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (see :func:`find_decoder_layers`); a CTPError if not found."""
    found = find_decoder_layers(model)
    if found is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise CTPError(f"cannot find the decoder layers of this {model_type or type(model).__name__} "
                       "model (no single list of the blocks named in its _no_split_modules)")
    return found[1]


def unsupported_reason(config: Any, trust_remote_code: bool = False,
                       model: nn.Module | None = None) -> str | None:
    """Why ctp cannot compress or prompt a model of this ``config`` (None when it can): checked
    on the configuration and on ``model``, or without one on an empty (meta-device) instance,
    so no weight is read."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return f"{model_type} is an encoder-decoder model; ctp handles decoder-only causal LMs"
    text = getattr(config, "get_text_config", lambda: config)()
    experts = next((f for f in _MOE_FIELDS if (getattr(text, f, None) or 0) > 1), None)
    if experts is not None:
        return (f"{model_type} has mixture-of-experts layers ({experts}={getattr(text, experts)}); "
                "ctp prunes and prompts dense decoder layers only")
    if model is None:
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError) as exc:
            return f"{model_type} is not a causal language model transformers can build ({_why(exc)})"
    if find_decoder_layers(model) is None:
        return (f"cannot find the decoder layers of {model_type} (no single list of the blocks "
                "named in its _no_split_modules)")
    return None


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
    """Read the model's config and refuse what ctp cannot handle, before loading weights."""
    config = _read_config(resolve_model(name), trust_remote_code)
    reason = unsupported_reason(config, trust_remote_code)
    if reason is not None:
        raise CTPError(f"unsupported model {name}: {reason}")
    return config


def check_weight_files(name: str) -> None:
    """Refuse a local model folder whose safetensors files are truncated or have a damaged header.

    Reads only each file's header (milliseconds, whatever the model's size), so a command that
    does minutes of work before loading the weights (tokenizing a training text) fails first.
    Hub ids are left to the loader.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(resolve_model(name)).expanduser()
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as weights:  # parses and checks the header
                weights.keys()
        except (OSError, SafetensorError) as exc:
            raise CTPError(f"cannot load model {name!r}: {path.name} is damaged ({_why(exc)})") from None


def check_model_supported(model: nn.Module) -> None:
    """:func:`check_supported` for a model already in memory."""
    reason = unsupported_reason(model.config, model=model)
    if reason is not None:
        raise CTPError(f"unsupported model: {reason}")


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
