"""Pruning decisions for one weight matrix, and the bookkeeping around them: which Linears are
pruned, whether a pattern fits them, and how much was zeroed.

Only ``nn.Linear`` modules inside the decoder layers are pruned; embeddings and the output head
are not. The layer-by-layer work itself is :mod:`ctp.compression.layers`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CompressConfig
from ..errors import CTPError
from ..models import decoder_layers
from .masks import matrix_mask, nm_mask, row_mask
from .scores import magnitude_score, wanda_score


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of one decoder layer (bitsandbytes' quantized ones included: they
    subclass ``nn.Linear``), by name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def layers_prefix(model: nn.Module) -> str:
    """The dotted name of the model's decoder-layer list (e.g. ``model.layers``)."""
    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear inside the decoder layers (also once quantized), by full module name."""
    prefix = layers_prefix(model)
    return {
        f"{prefix}.{i}.{name}": module
        for i, layer in enumerate(decoder_layers(model))
        for name, module in layer_linears(layer).items()
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


def pruning_mask(weight: torch.Tensor, config: CompressConfig,
                 input_sq_norm: torch.Tensor | None) -> torch.Tensor | None:
    """Magnitude's or Wanda's mask for ``weight`` (None when the config chooses its mask inside
    an OBS sweep, as SparseGPT does, or prunes nothing)."""
    if config.prune == "magnitude":
        return select_mask(magnitude_score(weight), config, per_row=config.magnitude_scope == "row")
    if config.prune == "wanda":
        return select_mask(wanda_score(weight, input_sq_norm), config, per_row=True)
    return None


def sparsity_summary(counts: dict[str, tuple[int, int]]) -> dict[str, object]:
    """Sparsity from ``{matrix name: (zeros, numel)}``: overall, per layer type (last name part,
    e.g. ``q_proj``), per matrix."""
    per_matrix, by_type = {}, {}
    zeros_total = numel_total = 0
    for name, (zeros, numel) in counts.items():
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
