"""Compressing the decoder layers one at a time: statistics, pruning, OBS sweeps, quantization.

One loop serves every method. For each decoder layer (on the work device), the calibration
windows run through it once while hooks gather the statistics its Linears need -- Wanda's input
norms and/or the inputs' Hessian, shared by Linears that read the same tensor (q/k/v, gate/up) --
then every Linear is pruned (magnitude / Wanda masks, or a SparseGPT sweep), rounded (bitsandbytes'
round-to-nearest, or an OBS sweep onto its grid) and replaced by bitsandbytes' own module. The
compressed layer then runs again to produce the next layer's inputs, so each layer is calibrated
on what the already-compressed layers before it produce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import CompressConfig
from ..errors import CTPError
from ..runtime import disable_cpu_packing_
from .calibrate import layer_by_layer
from .obs import Codebook4bit, Hessian, NotPositiveDefinite, RowInt8, SweepResult, sweep
from .prune import check_prunable, layer_linears, layers_prefix, pruning_mask
from .quantize import is_skipped, quantized_linear, replace_module_
from .scores import InputNorms


@dataclass
class Plan:
    """What happens to each Linear: the config, and (when quantizing) how modules are built."""

    config: CompressConfig
    quantize: bool = False
    skip: list[str] = field(default_factory=list)  # modules left unquantized
    compute_dtype: torch.dtype = torch.float32
    stored_dtype: torch.dtype = torch.float16
    work_dtype: torch.dtype | None = None  # each layer's dtype while it is compressed (None: as held)

    @property
    def norms(self) -> bool:
        return self.config.prune == "wanda" and self.config.sparsity > 0

    @property
    def hessian(self) -> bool:
        return ((self.config.prune == "sparsegpt" and self.config.sparsity > 0)
                or (self.quantize and self.config.rounding == "obs"))

    @property
    def calibrated(self) -> bool:
        return self.norms or self.hessian


def needs_calibration(config: CompressConfig) -> bool:
    """Whether compressing with ``config`` needs calibration text."""
    return Plan(config, quantize=config.quant != "none").calibrated


class _Inputs:
    """The statistics of one input tensor (shared by every Linear that reads it)."""

    def __init__(self, in_features: int, device: torch.device, plan: Plan) -> None:
        self.norms = InputNorms(in_features, device) if plan.norms else None
        self.hessian = Hessian(in_features, device) if plan.hessian else None

    def update(self, x: torch.Tensor) -> None:
        if self.norms is not None:
            self.norms.update(x)
        if self.hessian is not None:
            self.hessian.update(x)


def collect(linears: dict[str, nn.Linear], plan: Plan, device: torch.device,
            run: Callable[[], None]) -> dict[str, _Inputs]:
    """Run the calibration windows once and return each Linear's input statistics.

    Linears fed the very same tensor (identity, not equality) in the first batch share one
    statistic, updated once per batch: q/k/v read one normalised hidden state, gate/up another.
    """
    stats: dict[str, _Inputs] = {}
    leader: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # this batch's inputs, kept alive: identity holds

    def hook(name: str, x: torch.Tensor) -> None:
        if name in leader:  # a follower: its leader counted this tensor
            return
        if any(owner == name for _, owner in seen):  # back at a Linear of this batch: the next
            seen.clear()
        if name not in stats:  # first batch: share with a Linear fed this very tensor
            owner = next((o for tensor, o in seen if tensor is x), None)
            if owner is not None:
                leader[name] = owner
                return
            stats[name] = _Inputs(x.shape[-1], device, plan)
        seen.append((x, name))
        stats[name].update(x)

    handles = [lin.register_forward_hook(lambda mod, args, out, n=name: hook(n, args[0]))
               for name, lin in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    return {name: stats[leader.get(name, name)] for name in linears}


def _sweep(name: str, weight: torch.Tensor, inputs: _Inputs, mask: torch.Tensor | None,
           config: CompressConfig, rounding: bool) -> SweepResult:
    quantizer = None
    if rounding:
        quantizer = RowInt8() if config.quant == "int8" else Codebook4bit(config.quant)
    sparsegpt = config.prune == "sparsegpt"
    try:
        return sweep(weight, inputs.hessian.value,
                     sparsity=config.sparsity if sparsegpt and config.nm is None else 0.0,
                     nm=config.nm if sparsegpt else None, mask=mask, quantizer=quantizer,
                     blocksize=config.blocksize, dampening=config.dampening)
    except NotPositiveDefinite:
        raise CTPError(f"the Hessian of {name}'s calibration inputs is not positive definite even "
                       f"with dampening {config.dampening:g}: use a larger --dampening (e.g. "
                       f"{min(1.0, config.dampening * 10):g}) or more calibration samples") from None


@torch.no_grad()
def compress_linear(name: str, linear: nn.Linear, inputs: _Inputs | None,
                    plan: Plan) -> tuple[nn.Module, tuple[int, int]]:
    """Prune and (when planned) quantize one Linear; returns the module that replaces it and
    ``(zeros, numel)`` of its pruning mask (exact zeros it already had included)."""
    config = plan.config
    weight = linear.weight.detach()
    weight = weight.double() if weight.dtype == torch.float64 else weight.float()
    norms = inputs.norms.value if inputs is not None and inputs.norms is not None else None
    mask = pruning_mask(weight, config, norms) if config.sparsity > 0 else None
    quantize = plan.quantize and not is_skipped(name, plan.skip)
    rounding = quantize and config.rounding == "obs"
    rounded = None
    if (config.prune == "sparsegpt" and config.sparsity > 0) or rounding:
        rounded = _sweep(name, weight, inputs, mask, config, rounding)
        mask, new = rounded.mask, rounded.weight
    else:
        new = weight if mask is None else weight.masked_fill(mask, 0)
    zeros = int(((weight == 0) | mask).sum()) if mask is not None else int((weight == 0).sum())
    linear.weight.data.copy_(new.to(linear.weight.dtype))
    if not quantize:
        return linear, (zeros, weight.numel())
    module = quantized_linear(linear, config.quant, config.double_quant, plan.compute_dtype,
                              plan.stored_dtype, rounded if rounding else None)
    return module, (zeros, weight.numel())


def compress_layers_(model: nn.Module, plan: Plan, calibration: torch.Tensor | None,
                     device: torch.device, progress: bool = True) -> dict[str, tuple[int, int]]:
    """Compress every Linear of every decoder layer in place, one layer at a time on ``device``.

    Args:
        plan: the config and how to quantize (see :class:`Plan`).
        calibration: token ids ``[nsamples, seqlen]`` (needed when ``plan.calibrated``).
    Returns:
        ``{full Linear name: (zeros, numel)}`` of the pruning masks.
    """
    if plan.calibrated and calibration is None:
        raise CTPError(f"{plan.config.label()} needs calibration data")
    check_prunable(model, plan.config)
    prefix, counts = layers_prefix(model), {}

    def process(index: int, layer: nn.Module, run: Callable[[], None] | None) -> None:
        linears = {n: m for n, m in layer_linears(layer).items() if type(m) is nn.Linear}
        stats = collect(linears, plan, device, run) if run is not None else {}
        for name, linear in linears.items():
            full = f"{prefix}.{index}.{name}"
            module, counts[full] = compress_linear(full, linear, stats.get(name), plan)
            if module is not linear:
                replace_module_(layer, name, module)
        disable_cpu_packing_(layer)  # the next run is inference: no repacking (see runtime)

    layer_by_layer(model, calibration if plan.calibrated else None, device, process,
                   plan.config.calib_batch_size, progress, plan.work_dtype)
    return counts


def prune_(
    model: nn.Module,
    config: CompressConfig,
    calibration: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, tuple[int, int]]:
    """Prune ``model``'s decoder Linears in place (no quantization, whatever ``config.quant``).

    Args:
        config: method, sparsity and pattern (``config.prune == "none"`` does nothing).
        calibration: token ids ``[nsamples, seqlen]`` (wanda and sparsegpt).
        device: where each decoder layer is calibrated; the model may live elsewhere (CPU).
    Returns:
        ``{Linear name: (zeros, numel)}`` after pruning.
    """
    if config.prune == "none" or config.sparsity == 0.0:
        return {}
    return compress_layers_(model, Plan(config), calibration, torch.device(device), progress)
