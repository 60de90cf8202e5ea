"""bitsandbytes quantization: configs, platform checks, and reading quantized weights back.

Quantization happens by loading the (pruned) dense checkpoint with a ``BitsAndBytesConfig``, the
path transformers itself serialises, so the result is a standard checkpoint that
``AutoModelForCausalLM.from_pretrained`` loads without ctp. Zero weights stay exactly zero: NF4
and FP4 code books contain 0 and scale by absmax with no zero point, and int8 is row-wise absmax.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..runtime import import_bnb

log = logging.getLogger(__name__)

# bitsandbytes' packed CPU kernel for 4-bit inference needs out_features divisible by 32 and
# in_features divisible by the quantization block size (64).
CPU_4BIT_OUT_BLOCK = 32
BNB_4BIT_BLOCKSIZE = 64


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
