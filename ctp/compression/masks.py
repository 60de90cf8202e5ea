"""Mask selection: pure tensor functions, no hooks, devices or I/O.

Every function takes a score matrix ``[out_features, in_features]`` (higher = more important)
and returns a boolean mask of the same shape where ``True`` marks a weight to set to zero.
Ties are broken by position (stable sort), so results are deterministic.
"""

from __future__ import annotations

import torch

from ..errors import CTPError


def _lowest(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries along ``dim`` (stable: earlier index first on ties)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=dim, stable=True).indices.narrow(dim, 0, k)
        mask.scatter_(dim, idx, True)
    return mask


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, the lowest ``int(in_features * sparsity)`` scores (Wanda's grouping)."""
    return _lowest(score, int(score.shape[1] * sparsity), dim=1)


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The lowest ``int(numel * sparsity)`` scores of the whole matrix: one threshold per matrix."""
    return _lowest(score.reshape(-1), int(score.numel() * sparsity), dim=0).view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every block of ``m`` consecutive input columns of each row, the ``n`` lowest scores."""
    rows, cols = score.shape
    if cols % m:
        raise CTPError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}")
    blocks = score.reshape(rows, cols // m, m)
    return _lowest(blocks, n, dim=2).view(rows, cols)
