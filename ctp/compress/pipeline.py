"""``compress()``: load -> (calibrate) -> prune -> quantize -> save, with a report."""

from __future__ import annotations

import gc
import logging
import shutil
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
from ..models import EMBEDDED_NAME, check_supported, decoder_layers, load_model, load_tokenizer, weights_fingerprint
from ..runtime import TORCH_DTYPES, device_map_for, peak_memory, require_bnb, resolve_device
from .prune import check_prunable, decoder_linears, prune_, sparsity_of
from .quantize import bnb_config, dense_weight, modules_to_skip

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


def _folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def _calibration(config: CompressConfig, model: nn.Module, tokenizer: Any,
                 calibration: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
    if config.prune != "wanda" or config.sparsity == 0.0:
        return None, {}
    if calibration is not None:
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise CTPError("calibration must be a LongTensor [nsamples, seqlen] of token ids")
        return calibration, {"source": "tensor", "nsamples": calibration.shape[0],
                             "seqlen": calibration.shape[1], "seed": None}
    if tokenizer is None:
        raise CTPError("wanda pruning needs a tokenizer or a calibration tensor")
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    seqlen = config.seqlen or min(context, 2048)
    if seqlen > context:
        raise CTPError(f"calibration seqlen {seqlen} exceeds the model's context of {context}")
    ids = calibration_ids(tokenizer, config.calib, config.nsamples, seqlen, config.seed)
    return ids, {"source": source_label(config.calib), "nsamples": config.nsamples,
                 "seqlen": seqlen, "seed": config.seed}


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

    Args:
        model: hub id, local folder, ``"embedded"``, or a loaded model. A loaded model is
            consumed: it is pruned in place, saved, and its weights are released (moved to the
            ``meta`` device) before the result is reloaded -- use ``result.model`` afterwards.
        config: what to do (defaults: Wanda 50% unstructured, then NF4).
        out: output folder, written atomically (temporary folder, then rename); ``None`` keeps
            the result in memory only.
        tokenizer: needed for calibration text and saved with the model; loaded from ``model``
            when that is a name.
        calibration: ready calibration token ids ``[nsamples, seqlen]`` (skips text sampling).
        overwrite: replace an existing ``out``.
    Returns:
        the compressed model (4-bit bitsandbytes modules when quantized), a report (also
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

    if isinstance(model, str):
        name = model
        hf_config = check_supported(name, config.trust_remote_code)
        stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        stored_dtype = TORCH_DTYPES.get(str(stored).replace("torch.", ""), torch.float16)
        work_dtype = (TORCH_DTYPES[config.dtype] if config.dtype != "auto"
                      else torch.float32 if device.type == "cpu" else stored_dtype)
        model = load_model(name, dtype=work_dtype, device="cpu",
                           trust_remote_code=config.trust_remote_code, revision=config.revision)
        if tokenizer is None:
            tokenizer = load_tokenizer(name, config.trust_remote_code, config.revision)
    else:
        name = getattr(model.config, "_name_or_path", "") or "in-memory model"
        decoder_layers(model)  # refuses unsupported architectures
        stored_dtype = next(model.parameters()).dtype
    model.eval()
    check_prunable(model, config)
    fingerprint = weights_fingerprint(model)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_bytes = dense_params * torch.finfo(stored_dtype).bits // 8

    ids, calib_record = _calibration(config, model, tokenizer, calibration)
    prune_started = time.time()
    prune_(model, config, ids, device, progress)
    prune_seconds = time.time() - prune_started
    pruned = sparsity_of({n: m.weight.detach() for n, m in decoder_linears(model).items()})
    pruned.pop("by_matrix")

    compute_dtype = (TORCH_DTYPES[config.compute_dtype] if config.compute_dtype != "auto"
                     else torch.bfloat16 if device.type == "cuda" else torch.float32)
    staging_ctx = (atomic_dir(out, overwrite) if out is not None
                   else tempfile.TemporaryDirectory(prefix="ctp-compress-"))
    with staging_ctx as staging:
        staging = Path(staging)
        model.to(stored_dtype)
        skipped = modules_to_skip(model, config.quant) if config.quant != "none" else []
        model = _save_and_reload(model, staging, config, compute_dtype, stored_dtype, skipped, device)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        else:
            log.warning("no tokenizer given: the checkpoint is saved without one")
        weights = {n: dense_weight(m) for n, m in decoder_linears(model).items()}
        achieved = sparsity_of(weights)
        del weights
        disk_bytes = _folder_bytes(staging)
        report = {
            "ctp_version": __version__,
            "base_model": name,
            "base_model_local": name != EMBEDDED_NAME and Path(name).expanduser().exists(),
            "base_revision": config.revision or getattr(model.config, "_commit_hash", None),
            "base_fingerprint": fingerprint,
            "compression": to_dict(config),
            "label": config.label(),
            "calibration": calib_record,
            "unquantized_modules": skipped,
            "sparsity_after_pruning": pruned,
            "sparsity": achieved,  # of the stored weights: quantization may round more to zero
            "parameters": dense_params,
            "dense_bytes": dense_bytes,
            "disk_bytes": disk_bytes,
            "bits_per_weight": disk_bytes * 8 / dense_params,
            "prune_seconds": round(prune_seconds, 3),
            "seconds": round(time.time() - started, 3),
            "peak_memory": peak_memory(device),
            "device": str(device),
            "versions": _versions(),
        }
        write_json(Path(staging) / COMPRESSION_FILE, report)
    return CompressResult(model=model, report=report, out=Path(out) if out is not None else None)


def _save_and_reload(model: nn.Module, staging: Path, config: CompressConfig,
                     compute_dtype: torch.dtype, stored_dtype: torch.dtype, skipped: list[str],
                     device: torch.device) -> nn.Module:
    """Save the pruned dense model, free it, and reload it (quantized when asked) from disk.

    The returned model is exactly what a user gets from ``from_pretrained(out)``: quantization
    goes through transformers' own bitsandbytes path, and buffers that are not saved (rotary
    frequencies) are rebuilt rather than kept in the pruning dtype.
    """
    from transformers import AutoModelForCausalLM

    quantized = config.quant != "none"
    source = Path(tempfile.mkdtemp(prefix=".dense-", dir=staging.parent)) if quantized else staging
    try:
        model.save_pretrained(source)
        model.to("meta")  # release the dense weights now, whoever still references the model
        gc.collect()
        reloaded = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=(bnb_config(config.quant, config.double_quant, compute_dtype, skipped)
                                 if quantized else None),
            dtype=stored_dtype,
            device_map=device_map_for(device),
            trust_remote_code=config.trust_remote_code,
        )
    finally:
        if quantized:
            shutil.rmtree(source, ignore_errors=True)
    reloaded.eval()
    if quantized:
        reloaded.save_pretrained(staging)
    return reloaded


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
