"""bitsandbytes quantization: configs, platform checks, and reading quantized weights back.

Quantization happens by loading the (pruned) dense checkpoint with a ``BitsAndBytesConfig``, the
path transformers itself serialises, so the result is a standard checkpoint that
``AutoModelForCausalLM.from_pretrained`` loads without ctp. Zero weights stay exactly zero: NF4
and FP4 code books contain 0 and scale by absmax with no zero point, and int8 is row-wise absmax.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import CTPError

log = logging.getLogger(__name__)

# bitsandbytes' packed CPU kernel for 4-bit inference needs out_features divisible by 32 and
# in_features divisible by the quantization block size (64).
CPU_4BIT_OUT_BLOCK = 32
BNB_4BIT_BLOCKSIZE = 64


@contextmanager
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


def modules_to_skip(model: nn.Module, quant: str) -> list[str]:
    """Modules left unquantized: the output head, and (4-bit) Linears bitsandbytes' CPU path
    cannot run (out_features not divisible by 32 or in_features by 64), each with a warning."""
    skip = []
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            skip.append(name)
        elif (quant in ("nf4", "fp4") and isinstance(module, nn.Linear)
              and (module.out_features % CPU_4BIT_OUT_BLOCK or module.in_features % BNB_4BIT_BLOCKSIZE)):
            log.warning(
                "leaving %s unquantized: its shape %dx%d is not a multiple of %dx%d, which "
                "bitsandbytes' CPU 4-bit kernel requires", name, module.out_features,
                module.in_features, CPU_4BIT_OUT_BLOCK, BNB_4BIT_BLOCKSIZE,
            )
            skip.append(name)
    return skip


def bnb_config(quant: str, double_quant: bool, compute_dtype: torch.dtype, skip: list[str]) -> Any:
    """The ``BitsAndBytesConfig`` for ``quant`` (nf4 / fp4 / int8)."""
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


@torch.no_grad()
def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight a Linear, bnb Linear4bit or Linear8bitLt effectively multiplies by (float32)."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        bnb = import_bnb()
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("read 4-bit weights before running CPU inference (packed layout)")
        return bnb.functional.dequantize_4bit(weight.data, quant_state).float()
    scb = getattr(weight, "SCB", None)
    if scb is None:  # after a forward pass bitsandbytes keeps the int8 row scales on module.state
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is not None and weight.dtype == torch.int8:
        return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return weight.detach().float()


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
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
                unpacked += 1
    if unpacked:
        log.warning("%d 4-bit layers had been repacked for CPU inference (scales rounded to "
                    "bfloat16); unpacked them so gradients flow", unpacked)
    return unpacked


def float32_on_cpu_(model: nn.Module) -> None:
    """Run a quantized model's CPU arithmetic in float32: its unquantized parameters (embeddings,
    norms, output head) are upcast from 16 bits, and 4-bit weights dequantize to float32.

    transformers keeps a pre-quantized checkpoint's stored 16-bit dtype whatever ``dtype`` asks,
    and a 16-bit residual stream on a CPU is both slow and coarse.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if type(param) is nn.Parameter and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = torch.float32
        if getattr(module, "compute_dtype", None) in (torch.float16, torch.bfloat16):
            module.compute_dtype = torch.float32


def ready_for_cpu_or_gpu_(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """What every quantized model ctp hands out gets: no CPU repacking (gradients flow, exact
    scales) and, on a CPU without an explicit 16-bit ``dtype``, float32 arithmetic."""
    disable_cpu_packing_(model)
    if device.type == "cpu" and dtype in (None, torch.float32):
        float32_on_cpu_(model)
