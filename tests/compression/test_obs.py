"""The OBS sweep against a textbook one-column-at-a-time OBS, and bitsandbytes' own storage."""

import math
from dataclasses import dataclass

import pytest
import torch

import bitsandbytes.functional as bnbf
from ctp.compression.obs import (Codebook4bit, Hessian, NotPositiveDefinite, RowInt8, inverse_cholesky,
                              max_dequant_error, pack_4bit, pack_int8, sweep)
from ties import TieBudget, lowest_k_cut

OUT, IN, TOKENS = 64, 256, 768
BNB_INV_127 = float(torch.tensor(1 / 127, dtype=torch.float32))  # bitsandbytes' int8 dequantization


def calibration(seed=0, cols=IN, dead=()):
    """Inputs ``[2, TOKENS/2, cols]`` with strongly correlated columns (low rank + noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, 16, generator=g) @ torch.randn(16, cols, generator=g)
    x = x + 0.3 * torch.randn(TOKENS, cols, generator=g)
    x[:, list(dead)] = 0
    return x.view(2, TOKENS // 2, cols)


def hessian_of(x):
    h = Hessian(x.shape[-1], "cpu")
    for chunk in x:
        h.update(chunk)
    return h.value


def weights(seed=1, rows=OUT, cols=IN):
    return 0.05 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def problem():
    x = calibration()
    return weights(), hessian_of(x), x.reshape(-1, IN)


# ---- the independent reference -----------------------------------------------------------------

def naive_sweep(w, h, *, sparsity=0.0, nm=None, mask=None, quant=None, blocksize=128, damp=0.01,
                follow=None, ties=None):
    """Textbook OBS in float64: column by column, each step with the inverse of H restricted to
    the columns not yet processed, inverted afresh. Masks use SparseGPT's rule with
    ``w^2 / [H_rest^-1]_jj`` (= ``w^2 / U_jj^2``); scales are fitted from the current weights.

    ``follow`` (a ``(mask, codes)`` pair, codes None without a quantizer) is the computation
    under test: wherever its mask or rounding code differs from the one chosen here, ``ties``
    (:func:`sweep_ties`) checks that the choice was a near-tie, and the reference adopts it and
    goes on, so each later column is compared on the same footing.
    """
    w, h = w.double().clone(), h.double()
    h = (h + h.T) / 2  # a float32 X^T X is symmetric only up to rounding (the sweep does the same)
    cols = w.shape[1]
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    inverses = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    rest = torch.stack([inv[0, 0] for inv in inverses])
    pruned = mask.clone() if mask is not None else torch.zeros_like(w, dtype=torch.bool)
    got_mask, got_codes = follow if follow is not None else (None, None)
    group = 64 if quant in ("nf4", "fp4") else cols
    code = bnbf.get_4bit_type(quant, device="cpu").double() if quant in ("nf4", "fp4") else None
    for j in range(cols):
        if sparsity and j % blocksize == 0:
            score = w[:, j:j + blocksize] ** 2 / rest[j:j + blocksize]
            k = math.floor(sparsity * score.numel() + 0.5)
            flat = torch.zeros(score.numel(), dtype=torch.bool)
            flat[torch.sort(score.reshape(-1), stable=True).indices[:k]] = True
            pruned[:, j:j + blocksize] = flat.view_as(score)
            if got_mask is not None:
                theirs = got_mask[:, j:j + blocksize]
                ties.mask.check(theirs, pruned[:, j:j + blocksize], score, lowest_k_cut(score, k), f"column {j}")
                pruned[:, j:j + blocksize] = theirs
        if nm and j % nm[1] == 0:
            score = w[:, j:j + nm[1]] ** 2 / rest[j:j + nm[1]]
            low = torch.sort(score, dim=1, stable=True).indices[:, :nm[0]]
            pruned[:, j:j + nm[1]] = torch.zeros_like(pruned[:, j:j + nm[1]]).scatter_(1, low, True)
            if got_mask is not None:
                theirs = got_mask[:, j:j + nm[1]]
                ties.mask.check(theirs, pruned[:, j:j + nm[1]], score, lowest_k_cut(score, nm[0], dim=1),
                                f"column {j}")
                pruned[:, j:j + nm[1]] = theirs
        if quant and j % group == 0:
            scale = w[:, j:j + group].masked_fill(pruned[:, j:j + group], 0).abs().amax(dim=1)
        col = w[:, j]
        if quant in ("nf4", "fp4"):
            scaled = (col / scale.clamp(min=1e-300)).clamp(-1, 1)
            index = (scaled[:, None] - code).abs().argmin(dim=1)
            if got_codes is not None:  # rounding flips where ``scaled`` sits on a midpoint of two codes
                theirs = got_codes[:, j].long()  # by value: FP4 has two codes for zero
                flipped = (code[theirs] != code[index]) & ~pruned[:, j]
                ties.rounding.check(flipped, torch.zeros_like(flipped), scaled,
                                    (code[theirs] + code[index]) / 2, f"column {j}")
                index = torch.where(flipped, theirs, index)
            q = code[index] * scale
        elif quant == "int8":
            scaled = col * 127 / scale
            level = torch.round(scaled).clamp(-127, 127)
            if got_codes is not None:  # in units of the row's absmax, like the 4-bit codes
                theirs = got_codes[:, j].double()
                flipped = (theirs != level) & ~pruned[:, j]
                ties.rounding.check(flipped, torch.zeros_like(flipped), scaled / 127,
                                    (theirs + level) / 2 / 127, f"column {j}")
                level = torch.where(flipped, theirs, level)
            q = level * scale * BNB_INV_127
        else:
            q = col.clone()
        q[pruned[:, j]] = 0
        inv = inverses[j]
        err = (col - q) / inv[0, 0]
        w[:, j + 1:] -= err[:, None] * inv[0, 1:][None, :]
        w[:, j] = q
    return w, pruned


@dataclass
class SweepTies:
    """The near-ties one sweep comparison allows: mask choices and rounding choices."""

    mask: TieBudget
    rounding: TieBudget


# How far a sweep in each dtype may drift from the float64 reference, relative to the largest
# weight: float32's eps (6e-8) times the condition number of the dampened Hessian (2.2e3 for
# ``calibration()``: low rank plus noise) is ~1e-4; measured up to 6.4e-5. float64: measured
# 1.5e-13 (the same symmetrized Hessian in both).
DRIFT = {torch.float32: 5e-4, torch.float64: 1e-10}
# How close to its block's cut a score must be for a mask flip to be a tie. A weight at the cut
# is ~1/6 of the largest and a score is its square, so the scores near the cut move by up to
# ~12x the weights' drift: 8e-4 relative in float32 (from the measured 6.4e-5), 2e-12 in float64.
MASK_RTOL = {torch.float32: 2e-3, torch.float64: 1e-9}


def sweep_ties(dtype, what=""):
    """What a sweep in ``dtype`` may choose differently from the float64 reference, and how often.

    A mask compares ``w^2 / U_jj^2`` with the cut of its block (MASK_RTOL); a rounding compares
    ``w / absmax`` with the midpoint of two codes, which moves by about the weights' DRIFT (the
    atol). Measured in float32: mask flips 4.4e-5 from the cut (relative), rounding flips 1.9e-6
    from a midpoint, 0-2 of each per sweep; at most 6 of each pass.
    """
    return SweepTies(TieBudget(6, rtol=MASK_RTOL[dtype], what=f"{what} mask"),
                     TieBudget(6, atol=DRIFT[dtype], what=f"{what} rounding"))


def assert_sweep_matches_reference(got, w, h, ties, **kwargs):
    """``got`` (a :class:`SweepResult`) equals the textbook OBS that follows its near-tie
    choices: every weight within DRIFT of the largest. Returns the reference weights."""
    want, want_mask = naive_sweep(w, h, follow=(got.mask, got.codes), ties=ties, **kwargs)
    assert torch.equal(got.mask, want_mask)
    drift = float((got.weight.double() - want).abs().max() / w.abs().max())
    assert drift <= DRIFT[got.weight.dtype], drift
    return want


def make_quantizer(quant):
    return None if quant is None else RowInt8() if quant == "int8" else Codebook4bit(quant)


CASES = {  # name: (sweep kwargs, naive kwargs)
    "unstructured": dict(sparsity=0.5),
    "2:4": dict(nm=(2, 4)),
    "fixed-mask": dict(mask=True),
    "nf4": dict(quant="nf4"),
    "fp4": dict(quant="fp4"),
    "int8": dict(quant="int8"),
    "unstructured+nf4": dict(sparsity=0.5, quant="nf4"),
    "2:4+nf4": dict(nm=(2, 4), quant="nf4"),
}


# 96 splits 64-column scale groups across blocks, which only matters with a quantizer.
@pytest.mark.parametrize("case,blocksize", [(c, b) for c in CASES for b in (128, 32, 96)
                                            if b != 96 or "quant" in CASES[c]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocked_sweep_equals_textbook_obs(problem, case, blocksize, dtype):
    w, h, _ = problem
    kw = dict(CASES[case])
    if kw.get("mask") is True:
        kw["mask"] = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) < 0.4
    quant = kw.pop("quant", None)
    got = sweep(w.to(dtype), h, quantizer=make_quantizer(quant), blocksize=blocksize, **kw)
    assert got.weight.dtype == dtype and got.loss > 0
    # Every row, every column: near-tie choices (checked, at most a handful) are followed.
    assert_sweep_matches_reference(got, w, h, sweep_ties(dtype, case), quant=quant, blocksize=blocksize, **kw)


def test_hessian_is_a_running_mean_of_2xtx():
    x = calibration()
    h = Hessian(IN)
    h.update(x[0, :100])
    h.update(x[:, 100:].reshape(2, -1, 4, IN))  # any leading dims
    flat = torch.cat([x[0, :100], x[:, 100:].reshape(-1, IN)])
    assert h.tokens == flat.shape[0]
    torch.testing.assert_close(h.value, 2 * flat.T @ flat / flat.shape[0], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        h.update(torch.zeros(3, IN + 1))


@pytest.mark.parametrize("sparsity,blocksize", [(0.5, 128), (0.3, 96), (0.77, 32)])
def test_unstructured_count_is_exact(problem, sparsity, blocksize):
    w, h, _ = problem
    res = sweep(w, h, sparsity=sparsity, blocksize=blocksize)
    want = sum(math.floor(sparsity * OUT * min(blocksize, IN - start) + 0.5)
               for start in range(0, IN, blocksize))
    assert int(res.mask.sum()) == want
    assert int((res.weight == 0).sum()) == want  # random weights: no extra zeros
    assert torch.equal(res.weight[res.mask], torch.zeros(want))


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_nm_every_group_has_exactly_n_zeros(problem, quant):
    w, h, _ = problem
    res = sweep(w, h, nm=(2, 4), quantizer=make_quantizer(quant))
    groups = res.mask.view(OUT, -1, 4)
    assert (groups.sum(dim=2) == 2).all()
    zeros = (res.weight == 0).view(OUT, -1, 4)
    if quant is None:  # random weights: no other zeros
        assert torch.equal(zeros, groups)
    else:  # NF4 has a 0 code: small survivors may round to it
        assert (zeros | ~groups).all() and zeros.sum() > groups.sum()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_dequantize_to_the_sweep_weights(problem, quant_type):
    w, h, _ = problem
    res = sweep(w, h, sparsity=0.5, quantizer=Codebook4bit(quant_type))
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 15
    assert res.absmax.shape == (OUT, IN // 64)
    assert torch.equal(res.weight, code[res.codes.long()] * res.absmax.repeat_interleave(64, dim=1))
    assert torch.equal(res.weight[res.mask], torch.zeros(int(res.mask.sum())))
    assert (code[res.codes[res.mask].long()] == 0).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bnb_dequantizes_the_packed_sweep_exactly(problem, quant_type, dtype):
    w, h, _ = problem
    res = sweep(w, h, sparsity=0.5, quantizer=Codebook4bit(quant_type))
    packed, state = pack_4bit(res.codes, res.absmax, quant_type, dtype)
    assert packed.shape == (OUT * IN // 2, 1) and packed.dtype == torch.uint8
    out = bnbf.dequantize_4bit(packed, state)
    assert out.dtype == dtype and torch.equal(out, res.weight.to(dtype))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_identity_hessian_reproduces_bnb_quantize_4bit_bytes(quant_type):
    w = weights(seed=3)
    w[5, 64:128] = 0  # an all-zero block: absmax 0
    res = sweep(w, torch.eye(IN), quantizer=Codebook4bit(quant_type))  # no coupling: plain rounding
    ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    packed, state = pack_4bit(res.codes, res.absmax, quant_type, torch.float32)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax) and state.shape == ref_state.shape
    assert torch.equal(bnbf.dequantize_4bit(packed, state), res.weight)
    assert max_dequant_error(res.weight, packed, state) == 0

    nested, nstate = pack_4bit(res.codes, res.absmax, quant_type, torch.float32, double_quant=True)
    _, ref_nstate = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                       compress_statistics=True)
    assert nstate.nested and torch.equal(nstate.absmax, ref_nstate.absmax)
    assert torch.equal(nstate.state2.absmax, ref_nstate.state2.absmax)
    assert nstate.offset.item() == ref_nstate.offset.item()
    err = max_dequant_error(res.weight, nested, nstate)
    assert 0 < err < 0.02 * w.abs().max()
    assert (bnbf.dequantize_4bit(nested, nstate)[5, 64:128] == 0).all()  # zero block survives


def test_int8_matches_bnb_storage_and_rounding(problem):
    w, h, _ = problem
    res = sweep(w, h, sparsity=0.5, quantizer=RowInt8())
    params = pack_int8(res.codes, res.absmax)
    assert params.dtype == torch.int8 and params.SCB.shape == (OUT,)
    assert torch.equal(bnbf.int8_vectorwise_dequant(params.CB, params.SCB), res.weight)
    assert torch.equal(res.weight[res.mask], torch.zeros(int(res.mask.sum())))

    w16 = w.half().float()  # bnb quantizes fp16 weights; match its input exactly
    rtn = sweep(w16, torch.eye(IN), quantizer=RowInt8())
    cb, scb, _ = bnbf.int8_vectorwise_quant(w16.half())
    assert torch.equal(rtn.codes, cb) and torch.equal(rtn.absmax, scb)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_error_propagation_beats_round_to_nearest(problem, quant):
    w, h, x = problem
    gptq = sweep(w, h, quantizer=make_quantizer(quant)).weight
    rtn = sweep(w, torch.eye(IN), quantizer=make_quantizer(quant)).weight
    def output_error(q):
        return ((w - q) @ x.T).square().sum()
    assert output_error(gptq) < 0.9 * output_error(rtn)


def test_dead_inputs_are_zeroed_and_match_reference():
    x = calibration(dead=(5, 77))
    h, w = hessian_of(x), weights()
    assert h[5, 5] == 0
    res = sweep(w, h, sparsity=0.5, quantizer=Codebook4bit("nf4"), blocksize=32)
    assert (res.weight[:, [5, 77]] == 0).all() and torch.isfinite(res.weight).all()
    # float32 sweep, float64 reference: masks and codes agree except at near-ties (2 of 16,384
    # mask entries flip on MKL's AVX-512 kernels), weights everywhere once those are followed
    assert_sweep_matches_reference(res, w, h, sweep_ties(torch.float32), sparsity=0.5, quant="nf4",
                                   blocksize=32)


def test_hopeless_hessian_raises_not_positive_definite():
    with pytest.raises(NotPositiveDefinite, match="dampening"):
        sweep(weights(), -torch.eye(IN), dampening=1e-6)
    assert issubclass(NotPositiveDefinite, ValueError)


def test_input_is_untouched_and_arguments_checked(problem):
    w, h, _ = problem
    w16 = w.bfloat16()
    before = w16.clone()
    res = sweep(w16, h, sparsity=0.5)
    assert torch.equal(w16, before) and res.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="not both"):
        sweep(w, h, sparsity=0.5, mask=torch.zeros(w.shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        sweep(w[:, :96], h[:96, :96], quantizer=Codebook4bit("nf4"))
    with pytest.raises(ValueError, match="N:M"):
        sweep(w, h, nm=(2, 4), blocksize=30)


def test_inverse_cholesky_is_the_upper_factor_of_the_dampened_inverse(problem):
    _, h, _ = problem
    h = (h.double() + h.double().T) / 2
    upper, dead = inverse_cholesky(h, 0.01, torch.float64)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(IN, dtype=torch.float64)
    assert torch.equal(upper, upper.triu()) and (upper.diagonal() > 0).all() and not dead.any()
    # U^T U = H^-1 defines the factor uniquely; compare through H to stay well conditioned.
    torch.testing.assert_close(upper.T @ upper @ damped, torch.eye(IN, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    want = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    torch.testing.assert_close(upper, want, rtol=1e-6, atol=1e-8)


def test_packed_weights_drop_into_bnb_modules(problem):
    import bitsandbytes as bnb

    w, h, x = problem
    res = sweep(w, h, sparsity=0.5, quantizer=Codebook4bit("nf4"))
    packed, state = pack_4bit(res.codes, res.absmax, "nf4", torch.float32, double_quant=True)
    linear = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit.from_prequantized(packed, state.as_dict(packed=True),
                                                        device="cpu", module=linear)
    keys = set(linear.state_dict())
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.quant_state.bitsandbytes__nf4"} <= keys
    deq = bnbf.dequantize_4bit(packed, state)
    torch.testing.assert_close(linear(x[:8]), x[:8] @ deq.T, rtol=1e-4, atol=1e-4)

    res8 = sweep(w, h, sparsity=0.5, quantizer=RowInt8())
    linear8 = bnb.nn.Linear8bitLt(IN, OUT, bias=False, has_fp16_weights=False)
    linear8.weight = pack_int8(res8.codes, res8.absmax)
    saved = linear8.state_dict()
    assert torch.equal(saved["weight"], res8.codes) and torch.equal(saved["SCB"], res8.absmax)
