"""Importance scores and the activation statistic Wanda needs: pure tensor math."""

from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32, ``[out_features, in_features]``."""
    return weight.detach().abs().float()


def wanda_score(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's |W_ij| * ||X_j||_2 in float32.

    Args:
        weight: ``[out_features, in_features]``.
        input_sq_norm: ``[in_features]``, the (scaled) squared L2 norm of each input feature
            over the calibration tokens; any positive common scale gives the same masks.
    """
    return weight.detach().abs().float() * input_sq_norm.to(weight.device).float().sqrt().unsqueeze(0)


class InputNorms:
    """Running mean over calibration sequences of each input feature's squared L2 norm.

    ``update(x)`` takes a Linear's input ``[..., seqlen, in_features]`` (or ``[tokens,
    in_features]``, counted as one sequence); the statistic after all updates is
    ``mean over sequences of sum over that sequence's tokens of x_j ** 2``, kept in float32.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.value = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.sequences = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        sequences = x.shape[0] if x.dim() == 3 else 1
        sq = x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
        total = self.sequences + sequences
        self.value.mul_(self.sequences / total).add_(sq.to(self.value.device) / total)
        self.sequences = total
