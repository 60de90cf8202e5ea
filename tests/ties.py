"""Comparing choices made by two correct computations: they may differ only at near-ties.

Two correct computations that sum in a different order (a blocked sweep and a textbook one,
float32 and float64, batch of 4 and batch of 1, one CPU's kernels and another's) round
differently. A number then differs a little, and a *selection* made from numbers -- a pruning
mask, an N:M group's lowest, a rounding code, an argmax, a greedy token -- can differ wherever
the compared scores are closer than that rounding. A test may allow exactly that and no more:

* a flipped position must be a near-tie: its score (as the reference computed it) lies within
  ``atol + rtol * |threshold|`` of the threshold it was compared with;
* there are at most a handful of flips in the whole comparison (a count, never a percentage).

References *follow* the computation under test at each allowed flip (they adopt its choice and
go on), so one near-tie never sets off differences downstream that are no tie at all: every
later choice and every number is compared again on the same footing.
"""

from __future__ import annotations

import torch


class TieBudget:
    """How many near-tie flips one comparison allows, and how close a near-tie must be.

    ``check`` takes two selections and the reference's scores; ``token`` takes a chosen token
    and the reference's logits. Both fail the test at a flip that is no near-tie, or at the flip
    that exceeds ``max_flips``; ``flips`` counts those seen so far.
    """

    def __init__(self, max_flips: int, *, rtol: float = 0.0, atol: float = 0.0, what: str = "") -> None:
        self.max_flips, self.rtol, self.atol, self.what = max_flips, rtol, atol, what
        self.flips = 0

    def check(self, got: torch.Tensor, want: torch.Tensor, score: torch.Tensor,
              threshold: torch.Tensor | float, where: str = "") -> int:
        """Bool selections ``got`` and ``want`` (same shape) may differ only where ``score``
        (same shape, the reference's) is within the tolerance of ``threshold`` (broadcastable:
        the cut of a lowest-k selection, a rounding midpoint, the largest logit). Returns the
        number of flips found here."""
        assert got.shape == want.shape == score.shape, (got.shape, want.shape, score.shape)
        flipped = got != want
        if not flipped.any():
            return 0
        score = score.double()
        threshold = torch.as_tensor(threshold, dtype=torch.float64, device=score.device).expand_as(score)
        gap = (score - threshold).abs()
        near = torch.isfinite(threshold) & (gap <= self.atol + self.rtol * threshold.abs())
        bad = flipped & ~near
        label = f"{self.what} {where}".strip()
        if bad.any():
            i = tuple(int(x) for x in bad.nonzero()[0])
            raise AssertionError(
                f"{label}: {int(bad.sum())} of {int(flipped.sum())} differing choices are no near-tie, "
                f"e.g. at {i}: score {float(score[i]):.9g}, threshold {float(threshold[i]):.9g}, gap "
                f"{float(gap[i]):.3g} (relative {float(gap[i] / threshold[i].abs().clamp(min=1e-300)):.3g}); "
                f"allowed: atol {self.atol:g} + rtol {self.rtol:g}")
        self.flips += int(flipped.sum())
        assert self.flips <= self.max_flips, (f"{label}: {self.flips} near-tie flips, more than the "
                                              f"{self.max_flips} this comparison allows")
        return int(flipped.sum())

    def token(self, got: int, logits: torch.Tensor, where: str = "") -> int:
        """``got``, checked to be the reference's argmax of ``logits [vocab]``, or a near-tie
        with it (``logits[got]`` within the tolerance of the largest logit: one flip)."""
        want = int(logits.argmax())
        if got != want:
            one = torch.ones(1, dtype=torch.bool)
            self.check(one, ~one, logits[[got]], logits[want], where)
        return got


def lowest_k_cut(score: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Where a lowest-``k`` selection cuts ``score`` (the whole tensor, or each slice along
    ``dim``, kept for broadcasting): midway between the k-th and the (k+1)-th lowest value."""
    d = 0 if dim is None else dim
    values = (score.reshape(-1) if dim is None else score).sort(dim=d).values
    if 0 < k < values.shape[d]:
        cut = (values.narrow(d, k - 1, 1) + values.narrow(d, k, 1)) / 2
    else:  # nothing to cut between: no flip is a near-tie (``check`` refuses an infinite cut)
        cut = torch.full_like(values.narrow(d, 0, 1), float("inf"))
    return cut.reshape(()) if dim is None else cut


# Two float32 computations of the same logits (a prompt cache or a prepended prompt, a batch or
# one row, one CPU's kernels or another's) differ by ~1e-6 on the tiny test models (measured
# up to 9.5e-7, logits of magnitude ~2); a greedy token may differ only where the two largest
# logits are closer than 100x that. Nearest top-two gaps seen in the tests' inputs: ~2e-3.
GREEDY_ATOL = 1e-4
GREEDY_FLIPS = 2  # per test: a tie that close is a ~1-in-1000 event per token
