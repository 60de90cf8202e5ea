"""Pruning: ``prune_(model, config, calibration_ids)`` zeroes weights of decoder Linears in place.

Methods are picked from :data:`METHODS`. Only ``nn.Linear`` modules inside the decoder layers
are pruned; embeddings and the output head are not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..config import CompressConfig
from ..errors import CTPError
from ..models import decoder_layers
from .calibrate import layer_by_layer
from .masks import matrix_mask, nm_mask, row_mask
from .scores import InputNorms, magnitude_score, wanda_score

log = logging.getLogger(__name__)


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of one decoder layer, by name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder layers, by full module name."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {
        f"{prefix}.{i}.{name}": linear
        for i, layer in enumerate(layers)
        for name, linear in layer_linears(layer).items()
    }


def check_prunable(model: nn.Module, config: CompressConfig) -> None:
    """Refuse an N:M pattern that does not divide every prunable Linear's input width."""
    if config.prune == "none" or config.nm is None:
        return
    n, m = config.nm
    for name, linear in decoder_linears(model).items():
        if linear.in_features % m:
            raise CTPError(
                f"pattern {n}:{m} needs every pruned Linear's input size divisible by {m}; "
                f"{name} has {linear.in_features}"
            )


def select_mask(score: torch.Tensor, config: CompressConfig, per_row: bool) -> torch.Tensor:
    """The zero mask for one weight matrix from its score, per the config's pattern."""
    if config.nm is not None:
        return nm_mask(score, *config.nm)
    return row_mask(score, config.sparsity) if per_row else matrix_mask(score, config.sparsity)


@torch.no_grad()
def _zero(linear: nn.Linear, mask: torch.Tensor) -> None:
    linear.weight.data.masked_fill_(mask.to(linear.weight.device), 0)


def _prune_magnitude(model, config, calibration, device, batch_size, progress) -> None:
    per_row = config.magnitude_scope == "row"
    for linear in decoder_linears(model).values():
        _zero(linear, select_mask(magnitude_score(linear.weight), config, per_row))


def _prune_wanda(model, config, calibration, device, batch_size, progress) -> None:
    if calibration is None:
        raise CTPError("wanda pruning needs calibration data")

    def process(index: int, layer: nn.Module, run: Callable[[], None]) -> None:
        linears = layer_linears(layer)
        norms = {name: InputNorms(lin.in_features, device) for name, lin in linears.items()}
        hooks = [
            lin.register_forward_hook(lambda mod, args, out, n=name: norms[n].update(args[0]))
            for name, lin in linears.items()
        ]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        for name, lin in linears.items():
            _zero(lin, select_mask(wanda_score(lin.weight, norms[name].value), config, per_row=True))

    layer_by_layer(model, calibration, device, process, batch_size, progress)


METHODS: dict[str, Callable[..., None]] = {
    "magnitude": _prune_magnitude,
    "wanda": _prune_wanda,
}


def prune_(
    model: nn.Module,
    config: CompressConfig,
    calibration: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> None:
    """Prune ``model``'s decoder Linears in place.

    Args:
        config: method, sparsity and pattern (``config.prune == "none"`` does nothing).
        calibration: token ids ``[nsamples, seqlen]`` (wanda only).
        device: where each decoder layer is calibrated; the model may live elsewhere (CPU).
    """
    if config.prune == "none" or config.sparsity == 0.0:
        return
    check_prunable(model, config)
    METHODS[config.prune](model, config, calibration, torch.device(device),
                          config.calib_batch_size, progress)


def sparsity_of(weights: dict[str, torch.Tensor]) -> dict[str, object]:
    """Achieved sparsity: overall, per layer type (last name part, e.g. ``q_proj``), per matrix."""
    per_matrix, by_type = {}, {}
    zeros_total = numel_total = 0
    for name, w in weights.items():
        zeros, numel = int((w == 0).sum()), w.numel()
        per_matrix[name] = zeros / numel
        kind = name.rsplit(".", 1)[-1]
        z, n = by_type.get(kind, (0, 0))
        by_type[kind] = (z + zeros, n + numel)
        zeros_total += zeros
        numel_total += numel
    return {
        "overall": zeros_total / max(1, numel_total),
        "by_type": {k: z / n for k, (z, n) in by_type.items()},
        "by_matrix": per_matrix,
    }
