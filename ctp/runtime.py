"""Where and in what precision things run: devices, dtypes, autocast, bitsandbytes readiness.

No model or algorithm knowledge lives here; :mod:`ctp.models`, the compressor, training and
evaluation all ask this module the same questions and get the same answers.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from typing import Any

import torch
from torch import nn

from .errors import CTPError

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
# The bitsandbytes releases whose internals ctp relies on (CPU repacking, serialization keys).
BNB_TESTED = ">=0.50.2,<0.51"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) -> the GPU when there is one, else the CPU; ``cuda:1`` is kept; a CUDA
    device on a machine without one is a CTPError."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise CTPError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CTPError(f"device {device} was requested but no CUDA GPU is available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise CTPError(f"device {device} was requested but this machine has "
                           f"{torch.cuda.device_count()} GPU(s)")
    elif resolved.type != "cpu":
        raise CTPError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def device_map_for(device: torch.device) -> dict[str, Any]:
    """The ``device_map`` that puts a whole model on ``device`` (transformers wants a GPU index)."""
    return {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (``float32``, ``float16``, ``bfloat16``; ``auto``/None -> None) as a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in TORCH_DTYPES:
        raise CTPError(f"unknown dtype {name!r}; choose from auto, {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """The dtype 4-bit layers compute in on ``device``: bfloat16 on a GPU, float32 on a CPU
    (CPU half-precision matmuls are slow and coarse)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision`` bf16, or auto on a GPU; otherwise nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak host RSS of this process and, on a GPU, peak allocated GPU memory (bytes)."""
    peak = {"cpu_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["gpu_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return peak


# ---------------------------------------------------------------------------------------------
# bitsandbytes
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_bnb():
    """Silence bitsandbytes' harmless notices about optional CPU kernels while it imports."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_bnb():
    """Import bitsandbytes quietly; a CTPError if it is not usable here."""
    try:
        with quiet_bnb():
            import bitsandbytes
    except Exception as exc:  # ImportError, or a backend failing to initialise
        raise CTPError(f"bitsandbytes is not available on this platform: {exc}") from None
    return bitsandbytes


def bnb_internal(module: str, name: str) -> Any:
    """A bitsandbytes internal ctp relies on; a CTPError naming the tested versions if this
    bitsandbytes lacks it."""
    import importlib

    bnb = import_bnb()
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise CTPError(f"bitsandbytes {getattr(bnb, '__version__', '?')} lacks {module}.{name}, "
                       f"which ctp needs; install bitsandbytes{BNB_TESTED}") from None


def require_bnb(device: torch.device | str, quant: str = "nf4") -> None:
    """Check that bitsandbytes can quantize on ``device``; a one-line CTPError if it cannot."""
    device = torch.device(device)
    bnb = import_bnb()
    probe = torch.linspace(-1, 1, 128, device=device)
    try:
        with quiet_bnb():
            if quant == "int8":
                bnb.functional.int8_vectorwise_quant(probe.view(2, 64).half())
            else:
                packed, state = bnb.functional.quantize_4bit(probe, quant_type=quant if quant != "none" else "nf4")
                bnb.functional.dequantize_4bit(packed, state)
    except Exception as exc:
        raise CTPError(
            f"{quant} quantization is not supported on {device.type} by this bitsandbytes "
            f"({getattr(bnb, '__version__', '?')}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def disable_cpu_packing_(model: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on their plain (dequantize + matmul) CPU path.

    bitsandbytes 0.50, on CPUs with AVX512-BF16, repacks a Linear4bit's weight the first time it
    runs in eval mode without gradients, rounding its scales to bfloat16, and from then on routes
    every call -- training included -- through ``gemv_4bit``, which has no autograd kernel: the
    gradient reaching a soft prompt becomes exactly zero, silently. ctp therefore never lets a
    layer repack. Layers already repacked (a model that already ran inference) are unpacked,
    with a warning: their scales stay bfloat16-rounded. Returns how many layers were unpacked.
    """
    unpacked = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                unpack = bnb_internal("bitsandbytes.functional", "_convert_weight_packed_for_cpu_inverse")
                module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)
                unpacked += 1
    if unpacked:
        log.warning("%d 4-bit layers had been repacked for CPU inference (scales rounded to "
                    "bfloat16); unpacked them so gradients flow", unpacked)
    return unpacked


def set_compute_dtype_(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every bitsandbytes 4-bit layer dequantize to and multiply in ``dtype``.

    The dtype stored in a checkpoint's ``bnb_4bit_compute_dtype`` is the one of the machine it
    was compressed on; the machine that runs it decides (bfloat16 on a GPU, float32 on a CPU).
    """
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = dtype
        if getattr(module, "compute_dtype", None) is not None:
            module.compute_dtype = dtype


def float32_on_cpu_(model: nn.Module) -> None:
    """Run a quantized model's CPU arithmetic in float32: its unquantized parameters (embeddings,
    norms, output head) are upcast from 16 bits, and 4-bit weights dequantize to float32.

    transformers keeps a pre-quantized checkpoint's stored 16-bit dtype whatever ``dtype`` asks,
    and a 16-bit residual stream on a CPU is both slow and coarse.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if type(param) is nn.Parameter and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    set_compute_dtype_(model, torch.float32)


def ready_for_device_(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """What every quantized model ctp hands out gets: no CPU repacking (gradients flow, exact
    scales), and the compute dtype of the device it runs on -- float32 arithmetic on a CPU
    (unless a 16-bit ``dtype`` is asked for), ``dtype`` or bfloat16 4-bit matmuls on a GPU."""
    disable_cpu_packing_(model)
    if device.type == "cpu" and dtype in (None, torch.float32):
        float32_on_cpu_(model)
    else:
        set_compute_dtype_(model, dtype or compute_dtype_for(device))
