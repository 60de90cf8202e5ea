"""Optimal Brain Surgeon column sweep: SparseGPT pruning, GPTQ rounding onto bitsandbytes grids.

Pure tensor math: no hooks, no model, no I/O; everything runs on the weight's device.

* :class:`Hessian` accumulates ``2 X^T X`` of a Linear's calibration inputs (a running mean).
* :func:`sweep` walks the input columns once, left to right. Each column is pruned and/or rounded,
  and its error ``(w - q) / U_jj`` is spread over the columns not yet processed, with ``U`` the
  upper Cholesky factor of ``H^-1`` (SparseGPT / GPTQ, blocked with a lazy batch update).
* :class:`Codebook4bit` (NF4/FP4) and :class:`RowInt8` (LLM.int8 rows) round onto exactly the grids
  bitsandbytes dequantizes from; :func:`pack_4bit` / :func:`pack_int8` write bitsandbytes' own
  storage, so its dequantization reproduces the sweep's weights bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

# bitsandbytes dequantizes int8 rows as ``CB * SCB * this`` (float32 1/127); the sweep multiplies
# in the same order so the two agree exactly.
INT8_SCALE = 7.874015718698502e-3


class NotPositiveDefinite(ValueError):
    """The dampened Hessian has no Cholesky factor."""


class Hessian:
    """Running ``2 X^T X / tokens`` of a Linear's inputs, accumulated in float32.

    ``update(x)`` takes ``x [..., in_features]``; ``value`` is ``[in_features, in_features]``. The
    running-mean scaling keeps the magnitude independent of the number of tokens (only the
    direction matters to :func:`sweep`). ``value`` is the live buffer: do not modify it.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.tokens = 0
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x [..., in_features]`` (moved to the accumulator's device)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(self._h.device, torch.float32)
        new = x.shape[0]
        if new == 0:
            return
        total = self.tokens + new
        self._h.mul_(self.tokens / total).addmm_(x.T, x, alpha=2.0 / total)
        self.tokens = total

    @property
    def value(self) -> torch.Tensor:
        """``[in_features, in_features]`` float32, ``2/tokens * sum x x^T``."""
        return self._h


class Quantizer(Protocol):
    """What :func:`sweep` needs from a rounding grid (one sweep at a time per object)."""

    group_size: int | None  # input columns sharing one scale per row; None = the whole row

    def reset(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> None: ...

    def fit(self, start: int, values: torch.Tensor) -> None:
        """Fix the scales of columns ``start: start + width`` from ``values [rows, width]``."""

    def round(self, j: int, w: torch.Tensor) -> torch.Tensor:
        """Round column ``j`` (``w [rows]``) onto the grid, record its codes, return the values."""

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [rows, cols], scales)`` of the finished sweep."""


class Codebook4bit:
    """bitsandbytes' 16-value NF4/FP4 code book with one absmax per row and ``blocksize`` columns.

    Requires ``in_features % blocksize == 0``, so each group is one bitsandbytes block (64
    consecutive elements of the row-major weight). Rounding is bitsandbytes' own: scale by
    ``1/absmax``, clamp to [-1, 1], nearest code (midpoints go to the lower code). An all-zero group
    keeps absmax 0, which bitsandbytes dequantizes to exactly 0. ``result()`` gives
    ``codes uint8 [rows, cols]`` (code-book indices) and ``absmax [rows, cols // blocksize]``.
    """

    def __init__(self, quant_type: str = "nf4", blocksize: int = 64) -> None:
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        from bitsandbytes.functional import get_4bit_type

        self.quant_type, self.group_size = quant_type, blocksize
        self.codebook = get_4bit_type(quant_type, device="cpu")  # float32 [16], in index order

    def reset(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> None:
        if cols % self.group_size:
            raise ValueError(f"4-bit blocks of {self.group_size} need in_features divisible by "
                             f"{self.group_size}, got {cols}")
        order = torch.argsort(self.codebook)
        # Midpoints in float32, as bitsandbytes computes them, so ties fall the same way.
        bounds = (self.codebook[order[:-1]] + self.codebook[order[1:]]) / 2
        self._bounds = bounds.to(device, dtype)
        self._order = order.to(device=device, dtype=torch.uint8)
        self._code = self.codebook.to(device, dtype)
        self._codes_t = torch.zeros(cols, rows, dtype=torch.uint8, device=device)
        self._absmax_t = torch.zeros(cols // self.group_size, rows, dtype=dtype, device=device)

    def fit(self, start: int, values: torch.Tensor) -> None:
        self._absmax_t[start // self.group_size] = values.abs().amax(dim=1)

    def round(self, j: int, w: torch.Tensor) -> torch.Tensor:
        absmax = self._absmax_t[j // self.group_size]
        scaled = (w * (1.0 / absmax.clamp(min=1e-38))).clamp_(-1, 1)
        codes = self._order[torch.bucketize(scaled, self._bounds)]
        self._codes_t[j] = codes
        return self._code[codes.long()] * absmax

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._codes_t.t().contiguous(), self._absmax_t.t().contiguous()


class RowInt8:
    """LLM.int8 weights: ``code = round(w * 127 / SCB)`` in [-127, 127], ``SCB`` = row absmax.

    The scale is fixed before the first column from the whole (dead-input-zeroed) row, excluding
    positions already known to be pruned. ``result()`` gives ``codes int8 [rows, cols]`` and
    ``SCB float [rows]``; bitsandbytes dequantizes ``codes * SCB * INT8_SCALE``.
    """

    group_size: int | None = None

    def reset(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> None:
        self._codes_t = torch.zeros(cols, rows, dtype=torch.int8, device=device)
        self._scb = torch.zeros(rows, dtype=dtype, device=device)

    def fit(self, start: int, values: torch.Tensor) -> None:
        self._scb = values.abs().amax(dim=1)
        self._inv = 127.0 / self._scb.clamp(min=1e-30)

    def round(self, j: int, w: torch.Tensor) -> torch.Tensor:
        codes = torch.round(w * self._inv).clamp_(-127, 127)
        self._codes_t[j] = codes.to(torch.int8)
        return codes * self._scb * INT8_SCALE

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._codes_t.t().contiguous(), self._scb


@dataclass
class SweepResult:
    """Output of :func:`sweep`.

    weight: ``[out, in]`` final values (float32; float64 for a float64 input), pruned entries 0.
    mask: bool ``[out, in]``, True = pruned (dead inputs are zeroed but not marked).
    codes / absmax: the quantizer's ``result()`` (None without a quantizer).
    loss: OBS error proxy ``sum(((w - q) / U_jj)^2) / 2``, in the Hessian's units.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    codes: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    loss: float = 0.0


def inverse_cholesky(hessian: torch.Tensor, dampening: float, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: upper Cholesky factor of ``(H + damp I)^-1`` ``[in, in]`` and the dead inputs.

    ``H`` is symmetrized; dead inputs (``H_ii == 0``) get ``H_ii = 1``; then
    ``damp = dampening * mean(diag(H))`` is added to the diagonal. ``U[j, j]^2`` equals
    ``[H_rest^-1]_jj`` with ``H_rest = H[j:, j:]``, and ``U[j] / U[j, j]`` is row ``j`` of
    ``H_rest^-1`` over its diagonal: exactly the textbook OBS sequence.
    """
    h = hessian.detach().to(dtype)
    h = (h + h.T) / 2  # a float32 X^T X is symmetric only up to rounding; use both halves alike
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1
    diag.add_(dampening * diag.mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0 or not torch.isfinite(upper).all():
        raise NotPositiveDefinite(
            f"the Hessian is not positive definite even with dampening {dampening}; "
            "use a larger dampening (e.g. 0.1) or more calibration tokens")
    return upper, dead


def _lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries of a 1-D ``score``; ties go to the earlier index."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    threshold = score.kthvalue(k).values
    mask = score < threshold
    ties = (score == threshold).nonzero().squeeze(1)[: k - int(mask.sum())]
    mask[ties] = True
    return mask


def _lowest_n_per_column(score: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` lowest of each column of ``score [m, rows]``; ties: earlier first.

    A rank by pairwise comparison: for small ``m`` it is several times faster than a sort.
    """
    m = score.shape[0]
    earlier = torch.ones(m, m, dtype=torch.bool, device=score.device).tril(-1)[:, :, None]
    below = (score[None] < score[:, None]) | ((score[None] == score[:, None]) & earlier)
    return below.sum(dim=1) < n


def sweep(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.0,
          nm: tuple[int, int] | None = None, mask: torch.Tensor | None = None,
          quantizer: Quantizer | None = None, blocksize: int = 128, dampening: float = 0.01
          ) -> SweepResult:
    """One blocked OBS sweep over the columns of ``weight [out, in]`` with ``hessian [in, in]``.

    Pruning, chosen from ``w^2 / U_jj^2`` like SparseGPT:

    * ``sparsity`` (unstructured): at each block start, the lowest ``round(sparsity * out * width)``
      scores of the whole ``out x width`` block (round half up; ties: row-major order first). The
      total is the sum over blocks, e.g. ``(in // blocksize) * round(sparsity * out * blocksize)``
      when ``blocksize`` divides ``in``; per row it varies.
    * ``nm=(n, m)``: at each column ``j % m == 0``, the ``n`` lowest of columns ``j:j+m`` per row,
      from the error-updated weights (needs ``m`` to divide ``in`` and ``blocksize``).
    * ``mask`` (bool ``[out, in]``, True = prune): a fixed mask, e.g. from Wanda; not combinable.

    Surviving weights are rounded by ``quantizer``; a scale group is fitted when the sweep reaches
    its first column, from the current weights with positions already known to be pruned excluded.
    Works in float32 (float64 for a float64 weight) on the weight's device; ``weight`` is not
    modified. Raises :class:`NotPositiveDefinite` when dampening cannot rescue ``hessian``.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    if not 0.0 <= sparsity < 1.0 or blocksize <= 0:
        raise ValueError(f"need 0 <= sparsity < 1 and blocksize > 0, got {sparsity}, {blocksize}")
    if mask is not None and (sparsity > 0 or nm is not None):
        raise ValueError("give either a fixed mask or sparsity/nm, not both")
    if mask is not None and (mask.shape != weight.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if nm is not None:
        n, m = nm
        if not 0 < n <= m or cols % m or blocksize % m:
            raise ValueError(f"N:M {n}:{m} needs 0 < n <= m, with m dividing in_features ({cols}) "
                             f"and blocksize ({blocksize})")

    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    upper, dead = inverse_cholesky(hessian.to(weight.device), dampening, dtype)
    # Work on the transpose so one input column is one contiguous row.
    w_t = torch.empty(cols, rows, dtype=dtype, device=weight.device).copy_(weight.detach().t())
    w_t[dead] = 0
    q_t = torch.empty_like(w_t)
    mask_t = torch.zeros_like(w_t, dtype=torch.bool)
    if mask is not None:
        mask_t.copy_(mask.t())
    group = cols
    if quantizer is not None:
        quantizer.reset(rows, cols, weight.device, dtype)
        group = quantizer.group_size or cols
    loss = torch.zeros((), dtype=dtype, device=weight.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block, mask_b = w_t[i1:i2], mask_t[i1:i2]  # views, updated in place
        u_b = upper[i1:i2, i1:i2]
        d = u_b.diagonal()
        err_b = torch.empty_like(block)
        if sparsity > 0 and nm is None:
            score = (block.square() / d.square()[:, None]).t().reshape(-1)
            k = math.floor(sparsity * score.numel() + 0.5)
            mask_b.copy_(_lowest_k(score, k).view(rows, -1).t())
        for i in range(i2 - i1):
            j = i1 + i
            if nm is not None and i % nm[1] == 0:
                score = block[i:i + nm[1]].square() / d[i:i + nm[1], None].square()
                mask_b[i:i + nm[1]] = _lowest_n_per_column(score, nm[0])
            if quantizer is not None and j % group == 0:
                quantizer.fit(j, _current(w_t, upper, err_b, mask_t, i1, i, i2, j + group).t())
            w, pruned = block[i], mask_b[i]
            q = w.masked_fill(pruned, 0)
            if quantizer is not None:
                q = quantizer.round(j, q).masked_fill_(pruned, 0)
            err = (w - q) / d[i]
            block[i + 1:].addr_(u_b[i, i + 1:], err, alpha=-1)
            q_t[j], err_b[i] = q, err
        w_t[i2:].addmm_(upper[i1:i2, i2:].t(), err_b, alpha=-1)  # lazy batch update
        loss += err_b.square().sum() / 2

    codes, absmax = quantizer.result() if quantizer is not None else (None, None)
    return SweepResult(q_t.t().contiguous(), mask_t.t().contiguous(), codes, absmax, float(loss))


def _current(w_t: torch.Tensor, upper: torch.Tensor, err_b: torch.Tensor, mask_t: torch.Tensor,
             i1: int, i: int, i2: int, end: int) -> torch.Tensor:
    """Error-updated ``[width, out]`` values of columns ``i1+i : end``, known-pruned entries 0.

    Columns past the block end have not had the lazy update of this block's first ``i`` errors;
    apply it to the copy here.
    """
    j = i1 + i
    values = w_t[j:end].clone()
    if end > i2 and i > 0:
        values[i2 - j:].addmm_(upper[i1:j, i2:end].t(), err_b[:i], alpha=-1)
    return values.masked_fill_(mask_t[j:end], 0)


def pack_4bit(codes: torch.Tensor, absmax: torch.Tensor, quant_type: str, dtype: torch.dtype,
              double_quant: bool = False, blocksize: int = 64) -> tuple[torch.Tensor, Any]:
    """bitsandbytes storage of code-book indices ``codes uint8 [out, in]`` with ``absmax``.

    Returns ``(packed uint8 [ceil(out*in/2), 1], QuantState)``: two indices per byte over the
    row-major flattened weight, the first in the high nibble (bitsandbytes' layout). ``absmax``
    (``[out, in // blocksize]`` or flat) is one float32 per block. With ``double_quant`` the absmax
    is stored 8-bit like bitsandbytes' ``compress_statistics`` (minus its mean, blocks of 256), so
    dequantization moves slightly; see :func:`max_dequant_error`. ``dtype`` is the output dtype.
    """
    import bitsandbytes.functional as bnbf

    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed = ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)
    absmax = absmax.reshape(-1).to(torch.float32)
    common = dict(shape=codes.shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                  code=bnbf.get_4bit_type(quant_type, device=codes.device))
    if not double_quant:
        return packed, bnbf.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    nested, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, bnbf.QuantState(absmax=nested, offset=offset, state2=state2, **common)


def max_dequant_error(weight: torch.Tensor, packed: torch.Tensor, state: Any) -> float:
    """Largest ``|dequantize_4bit(packed, state) - weight|`` (nonzero only with double quant)."""
    import bitsandbytes.functional as bnbf

    return (bnbf.dequantize_4bit(packed, state).float() - weight.float()).abs().max().item()


def pack_int8(codes: torch.Tensor, scb: torch.Tensor) -> Any:
    """``bnb.nn.Int8Params`` of ``codes int8 [out, in]`` (as data and CB), ``SCB float32 [out]``.

    A ``Linear8bitLt`` state dict stores these as ``weight`` and ``SCB`` (plus ``weight_format``
    0 = row-major); dequantization is ``CB * SCB * INT8_SCALE``.
    """
    from bitsandbytes.nn import Int8Params

    codes = codes.to(torch.int8).contiguous()
    return Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes,
                      SCB=scb.to(torch.float32).contiguous())
