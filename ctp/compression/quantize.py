"""bitsandbytes quantization in place: a Linear becomes bitsandbytes' own 4-bit or 8-bit module.

Each Linear is replaced by the module transformers builds when it loads a bitsandbytes checkpoint
(``Linear4bit`` / ``Linear8bitLt`` with the same settings), holding either bitsandbytes' own
round-to-nearest quantization (``rtn``) or the codes an OBS sweep chose (``obs``,
:mod:`ctp.compression.obs`), packed in bitsandbytes' storage. The model then saves once with
``save_pretrained`` and its ``quantization_config``: a standard checkpoint that
``AutoModelForCausalLM.from_pretrained`` loads without ctp, into exactly these modules.
Zero weights stay exactly zero: NF4 and FP4 code books contain 0 and scale by absmax with no
zero point, and int8 is row-wise absmax.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ..runtime import import_bnb
from .obs import INT8_SCALE, SweepResult, pack_4bit, pack_int8

log = logging.getLogger(__name__)

# bitsandbytes' packed CPU kernel for 4-bit inference needs out_features divisible by 32 and
# in_features divisible by the quantization block size (64).
CPU_4BIT_OUT_BLOCK = 32
BNB_4BIT_BLOCKSIZE = 64
INT8_THRESHOLD = 6.0  # BitsAndBytesConfig's default outlier threshold (llm_int8_threshold)


def modules_to_skip(model: nn.Module, quant: str) -> list[str]:
    """Modules left unquantized: the output head, those the model keeps in float32, and (4-bit)
    Linears bitsandbytes' CPU path cannot run (out_features not divisible by 32 or in_features
    by 64), each with a warning."""
    skip = list(getattr(model, "_keep_in_fp32_modules", None) or [])
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


def is_skipped(name: str, skip: list[str]) -> bool:
    """Whether module ``name`` matches a skip entry the way transformers matches
    ``llm_int8_skip_modules`` (a prefix up to a module boundary, or a suffix)."""
    return any(re.match(rf"(?:{re.escape(key)})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(key)
               for key in skip)


def bnb_config(quant: str, double_quant: bool, compute_dtype: torch.dtype, skip: list[str]) -> Any:
    """The ``BitsAndBytesConfig`` for ``quant`` (nf4 / fp4 / int8)."""
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip,
                                  llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


@torch.no_grad()
def quantized_linear(linear: nn.Linear, quant: str, double_quant: bool, compute_dtype: torch.dtype,
                     stored_dtype: torch.dtype, rounded: SweepResult | None = None) -> nn.Module:
    """bitsandbytes' module for ``linear`` (on the same device), as ``from_pretrained`` builds it.

    Without ``rounded`` the weight (cast to ``stored_dtype``, as a checkpoint holds it) goes
    through bitsandbytes' own quantizer; with it, the OBS sweep's codes and scales are stored.
    """
    bnb = import_bnb()
    device, bias = linear.weight.device, linear.bias
    if quant == "int8":
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias is not None,
                                     has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        if rounded is None:
            codes, scb, _ = bnb.functional.int8_vectorwise_quant(linear.weight.to(torch.float16))
        else:
            codes, scb = rounded.codes, rounded.absmax
        module.weight = pack_int8(codes.to(device), scb.to(device))
    else:
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias is not None,
                                   compute_dtype=compute_dtype, compress_statistics=double_quant,
                                   quant_type=quant, quant_storage=torch.uint8, device="meta")
        if rounded is None:
            packed, state = bnb.functional.quantize_4bit(
                linear.weight.to(stored_dtype), blocksize=BNB_4BIT_BLOCKSIZE,
                compress_statistics=double_quant, quant_type=quant, quant_storage=torch.uint8)
        else:
            packed, state = pack_4bit(rounded.codes.to(device), rounded.absmax.to(device), quant,
                                      stored_dtype, double_quant, BNB_4BIT_BLOCKSIZE)
        module.weight = bnb.nn.Params4bit.from_prequantized(
            packed, state.as_dict(packed=True), requires_grad=False, device=device, module=module)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().to(stored_dtype), requires_grad=False)
    module.source_cls = nn.Linear  # what transformers records on the modules it builds
    return module.requires_grad_(False)


def replace_module_(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` (dotted, relative to ``root``)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


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
        return weight.data.float() * scb.float().unsqueeze(1) * INT8_SCALE
    return weight.detach().float()
