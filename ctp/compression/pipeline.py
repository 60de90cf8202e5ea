"""``compress()``: load -> calibrate, prune and quantize layer by layer in place -> save once."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..artifacts import COMPRESSION_FILE, atomic_dir, check_output_dir, compression_matches, write_json
from ..config import CompressConfig, to_dict
from ..data import calibration_ids, source_label
from ..errors import CTPError
from ..lm import bos_token
from ..models import check_model_supported, check_supported, load_model, load_tokenizer, weights_fingerprint
from ..runtime import TORCH_DTYPES, compute_dtype_for, peak_memory, require_bnb, resolve_device
from ..zoo import NAMED_MODELS
from .layers import Plan, compress_layers_
from .prune import check_prunable, decoder_linears, sparsity_summary
from .quantize import bnb_config, dense_weight, is_skipped, modules_to_skip, quantized_linear, replace_module_

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """What :func:`compress` produced: the compressed model in memory, its report, its folder."""

    model: nn.Module
    report: dict[str, Any]
    out: Path | None


def is_complete(folder: str | Path, config: CompressConfig) -> bool:
    """Whether ``folder`` holds a finished compression made with exactly ``config``."""
    return compression_matches(folder, to_dict(config))


def _sizes(folder: Path, params: int, stored_dtype: torch.dtype) -> dict[str, Any]:
    """Parameters, bytes of the dense model, bytes on disk, and bits per weight (every stored
    byte, scales included, over all parameters)."""
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"parameters": params, "dense_bytes": params * torch.finfo(stored_dtype).bits // 8,
            "disk_bytes": disk, "bits_per_weight": disk * 8 / params}


def _calibration(plan: Plan, model: nn.Module, tokenizer: Any,
                 calibration: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
    config = plan.config
    if not plan.calibrated:
        return None, {}
    if calibration is not None:
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise CTPError("calibration must be a LongTensor [nsamples, seqlen] of token ids")
        return calibration, {"source": "tensor", "nsamples": calibration.shape[0],
                             "seqlen": calibration.shape[1], "seed": None}
    if tokenizer is None:
        raise CTPError(f"{config.label()} needs calibration text: a tokenizer or a calibration tensor")
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    bos = bos_token(config.bos, model.config, tokenizer)
    extra = int(bos is not None)
    seqlen = config.seqlen or min(context, 2048) - extra
    if seqlen + extra > context:
        raise CTPError(f"calibration seqlen {seqlen}{' plus BOS' if extra else ''} exceeds the "
                       f"model's context of {context}")
    ids = calibration_ids(tokenizer, config.calib, config.nsamples, seqlen, config.seed, bos)
    if bos is not None:  # the rule: BOS before every window, as the model will read them
        ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)
    return ids, {"source": source_label(config.calib), "nsamples": config.nsamples,
                 "seqlen": seqlen, "seed": config.seed, "bos_token_id": bos}


def compress(
    model: str | nn.Module,
    config: CompressConfig | None = None,
    out: str | Path | None = None,
    *,
    tokenizer: Any = None,
    calibration: torch.Tensor | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CompressResult:
    """Prune and quantize a causal LM; save it as a standard checkpoint when ``out`` is given.

    Decoder layers are calibrated, pruned and quantized one at a time on ``config.device``, in
    place (the model itself stays on the CPU), and the result is saved once. The returned model
    is what ``AutoModelForCausalLM.from_pretrained(out)`` loads.

    Args:
        model: hub id, local folder, a named model (``"embedded"``), or a loaded model (which
            is compressed in place: use ``result.model``, the same object, afterwards; its
            non-persistent buffers, such as rotary frequencies, stay as given).
        config: what to do (defaults: SparseGPT 50% unstructured, then NF4 with OBS rounding).
        out: output folder, written atomically (temporary folder, then rename); ``None`` keeps
            the result in memory only.
        tokenizer: needed for calibration text and saved with the model; loaded from ``model``
            when that is a name.
        calibration: ready calibration token ids ``[nsamples, seqlen]`` (skips text sampling).
        overwrite: replace an existing ``out``.
    Returns:
        the compressed model (bitsandbytes modules when quantized, on the CPU), a report (also
        written to ``out/ctp_compression.json``) and the output path.
    """
    config = config or CompressConfig()
    started = time.time()
    if out is not None:
        check_output_dir(out, overwrite)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if config.quant != "none":
        require_bnb(device, config.quant)
    model, name, tokenizer, stored_dtype = _load(model, config, device, tokenizer)
    work_dtype = (TORCH_DTYPES[config.dtype] if config.dtype != "auto"
                  else torch.float32 if device.type == "cpu" else stored_dtype)
    check_prunable(model, config)
    fingerprint = weights_fingerprint(model)
    dense_params = sum(p.numel() for p in model.parameters())
    skipped = modules_to_skip(model, config.quant) if config.quant != "none" else []
    plan = Plan(config, quantize=config.quant != "none", skip=skipped, stored_dtype=stored_dtype,
                compute_dtype=(TORCH_DTYPES[config.compute_dtype] if config.compute_dtype != "auto"
                               else compute_dtype_for(device)),
                work_dtype=work_dtype)
    ids, calib_record = _calibration(plan, model, tokenizer, calibration)
    layers_started = time.time()
    counts = compress_layers_(model, plan, ids, device, progress)
    layers_seconds = time.time() - layers_started
    _finish_(model, plan)
    pruned = sparsity_summary(counts)
    pruned.pop("by_matrix")
    staging_ctx = (atomic_dir(out, overwrite) if out is not None
                   else tempfile.TemporaryDirectory(prefix="ctp-compress-"))
    with staging_ctx as staging:
        staging = Path(staging)
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        else:
            log.warning("no tokenizer given: the checkpoint is saved without one")
        report = {
            "ctp_version": __version__,
            "base_model": name,
            "base_model_local": name not in NAMED_MODELS and Path(name).expanduser().exists(),
            "base_revision": config.revision or getattr(model.config, "_commit_hash", None),
            "base_fingerprint": fingerprint,
            "compression": to_dict(config),
            "label": config.label(),
            "calibration": calib_record,
            "unquantized_modules": skipped,
            "sparsity_after_pruning": pruned,
            "sparsity": stored_sparsity(model),  # of the stored weights: rounding may add zeros
            **_sizes(staging, dense_params, stored_dtype),
            "prune_seconds": round(layers_seconds, 3),  # the layer-by-layer work, quantization included
            "seconds": round(time.time() - started, 3),
            "peak_memory": peak_memory(device),
            "device": str(device),
            "versions": _versions(),
        }
        write_json(staging / COMPRESSION_FILE, report)
    return CompressResult(model=model, report=report, out=Path(out) if out is not None else None)


def _load(model: str | nn.Module, config: CompressConfig, device: torch.device,
          tokenizer: Any) -> tuple[nn.Module, str, Any, torch.dtype]:
    """The model to compress (on the CPU, in the dtype its checkpoint stores: one decoder layer
    at a time is cast to the work dtype, :func:`ctp.compression.calibrate.layer_by_layer`), its
    name, its tokenizer, and that stored dtype (what the output stores too)."""
    if isinstance(model, str):
        name = model
        hf_config = check_supported(name, config.trust_remote_code)
        stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        stored_dtype = TORCH_DTYPES.get(str(stored).replace("torch.", ""), torch.float16)
        model = load_model(name, dtype=stored_dtype, device="cpu",
                           trust_remote_code=config.trust_remote_code, revision=config.revision)
        if tokenizer is None:
            tokenizer = load_tokenizer(name, config.trust_remote_code, config.revision)
    else:
        name = getattr(model.config, "_name_or_path", "") or "in-memory model"
        check_model_supported(model)
        stored_dtype = next(model.parameters()).dtype
        if any(type(m) is not nn.Linear and isinstance(m, nn.Linear) for m in model.modules()):
            raise CTPError("the model given is already quantized; compress its dense base")
    return model.eval(), name, tokenizer, stored_dtype


@torch.no_grad()
def _finish_(model: nn.Module, plan: Plan) -> None:
    """After the decoder layers: quantize the other Linears (round to nearest: no calibration
    statistics reach them), store every other parameter in the checkpoint's dtype, and record
    the quantization config so ``save_pretrained`` writes what ``from_pretrained`` reads."""
    if plan.quantize:
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and not is_skipped(name, plan.skip):
                replace_module_(model, name, quantized_linear(
                    module, plan.config.quant, plan.config.double_quant, plan.compute_dtype,
                    plan.stored_dtype))
    for param in model.parameters():  # buffers (rotary frequencies) stay as the model built them
        if type(param) is nn.Parameter and param.is_floating_point() and param.dtype != plan.stored_dtype:
            param.data = param.data.to(plan.stored_dtype)
    model.eval()  # the modules built in place start in training mode
    model.config.dtype = plan.stored_dtype
    if plan.quantize:
        model.config.quantization_config = bnb_config(plan.config.quant, plan.config.double_quant,
                                                      plan.compute_dtype, plan.skip)


def stored_sparsity(model: nn.Module) -> dict[str, object]:
    """Exact zeros of every decoder Linear's effective weight, read one matrix at a time (a 7B
    model's weights never exist in float32 all at once)."""
    counts = {}
    for name, module in decoder_linears(model).items():
        weight = dense_weight(module)
        counts[name] = (int((weight == 0).sum()), weight.numel())
        del weight
    return sparsity_summary(counts)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
