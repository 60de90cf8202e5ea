"""Pruning against straightforward references written here, on every supported family."""

import copy

import pytest
import torch
from torch import nn

from conftest import ARCH_NAMES, calib_ids, linear_inputs, tiny_model
from ctp.compression.layers import prune_
from ctp.compression.prune import decoder_linears
from ctp.config import CompressConfig
from ctp.errors import CTPError
from ctp.models import decoder_layers
from ties import TieBudget, lowest_k_cut


def reference_wanda_masks(model, ids, sparsity=None, nm=None, follow=None, ties=None):
    """Naive sequential Wanda: for each layer in turn, run the WHOLE model (earlier layers
    already pruned) with hooks recording every Linear input of that layer, score
    |W| * ||X_j|| over all tokens, and zero the lowest k of each row (or n of each m-block).

    ``follow`` maps Linear names to the masks under test: where one differs from the mask
    chosen here, ``ties`` (a :class:`TieBudget`) checks that it is a near-tie of the scores and
    the reference prunes the followed mask, so later layers see the same model."""
    model = copy.deepcopy(model)
    masks = {}
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        inputs = linear_inputs(model, layer, ids)
        for n, lin in linears.items():
            name = f"{prefix}.{i}.{n}"
            x = inputs[n]
            score = (lin.weight.abs() * x.norm(dim=0)).detach()  # ||X_j||_2 over all tokens
            mask = torch.zeros_like(score, dtype=torch.bool)
            rows, cols = score.shape
            for r in range(rows):
                if nm is None:
                    k = int(cols * sparsity)
                    order = sorted(range(cols), key=lambda j: score[r, j].item())
                    mask[r, order[:k]] = True
                else:
                    n_, m_ = nm
                    for b in range(0, cols, m_):
                        order = sorted(range(b, b + m_), key=lambda j: score[r, j].item())
                        mask[r, order[:n_]] = True
            if follow is not None:
                if nm is None:
                    cut = lowest_k_cut(score, int(cols * sparsity), dim=1)
                else:
                    cut = lowest_k_cut(score.view(rows, -1, nm[1]), nm[0], dim=2).expand(
                        rows, cols // nm[1], nm[1]).reshape(rows, cols)
                ties.check(follow[name], mask, score, cut, name)
                mask = follow[name]
            masks[name] = mask
            with torch.no_grad():
                lin.weight[mask] = 0
    return masks


# Two correct computations of the same Wanda scores: ctp's layer-by-layer capture in batches
# with float32 running norms, and the reference's whole-model forward. Their activations agree
# to ~1e-6 relative (float32 rounding in another order), so a mask may flip only where a score
# is within WANDA_RTOL of its row's (or block's) cut: a handful (WANDA_FLIPS) in a whole model.
WANDA_RTOL, WANDA_FLIPS = 1e-4, 6


def assert_masks_follow_reference(model, original, ids, **selection):
    """The masks ``model`` was pruned with are the naive reference's on ``original``, but for
    near-ties (which the reference then follows). Returns the number of flips."""
    got = {name: lin.weight == 0 for name, lin in decoder_linears(model).items()}
    ties = TieBudget(WANDA_FLIPS, rtol=WANDA_RTOL, what="wanda mask")
    reference = reference_wanda_masks(original, ids, follow=got, ties=ties, **selection)
    assert reference.keys() == got.keys()
    return ties.flips


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_wanda_unstructured_equals_naive_reference(arch):
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    ids = calib_ids(nsamples=6, seqlen=32)
    prune_(model, CompressConfig(prune="wanda", sparsity=0.5, calib_batch_size=4), ids, progress=False)
    assert_masks_follow_reference(model, original, ids, sparsity=0.5)
    for name, lin in decoder_linears(model).items():
        zeros_per_row = (lin.weight == 0).sum(dim=1)
        assert (zeros_per_row == int(lin.in_features * 0.5)).all(), name


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_wanda_nm_equals_reference_and_every_block_has_n_zeros(arch, pattern):
    n, m = map(int, pattern.split(":"))
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    ids = calib_ids(nsamples=4, seqlen=32)
    prune_(model, CompressConfig(prune="wanda", pattern=pattern), ids, progress=False)
    assert_masks_follow_reference(model, original, ids, nm=(n, m))
    for name, lin in decoder_linears(model).items():
        blocks = (lin.weight == 0).view(lin.out_features, -1, m).sum(dim=2)
        assert (blocks >= n).all(), name


def test_magnitude_one_threshold_per_matrix():
    model = tiny_model("llama")
    original = {n: l.weight.detach().clone() for n, l in decoder_linears(model).items()}
    prune_(model, CompressConfig(prune="magnitude", sparsity=0.6, quant="none"), progress=False)
    for name, lin in decoder_linears(model).items():
        w0 = original[name].abs()
        pruned = lin.weight == 0
        assert pruned.sum() == int(w0.numel() * 0.6)
        assert w0[pruned].max() <= w0[~pruned].min()  # a single matrix-wide threshold
        torch.testing.assert_close(lin.weight[~pruned], original[name][~pruned], rtol=0, atol=0)


def test_magnitude_per_row_scope():
    model = tiny_model("qwen2")
    original = {n: l.weight.detach().abs().clone() for n, l in decoder_linears(model).items()}
    prune_(model, CompressConfig(prune="magnitude", sparsity=0.25, magnitude_scope="row"), progress=False)
    for name, lin in decoder_linears(model).items():
        pruned = lin.weight == 0
        assert (pruned.sum(dim=1) == int(lin.in_features * 0.25)).all()
        for w0, row in zip(original[name], pruned):  # each row's own threshold
            assert w0[row].max() <= w0[~row].min(), name


def test_embeddings_and_head_are_not_pruned():
    model = tiny_model("llama")
    embed = model.get_input_embeddings().weight.clone()
    head = model.get_output_embeddings().weight.clone()
    prune_(model, CompressConfig(prune="magnitude", sparsity=0.5), progress=False)
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert torch.equal(model.get_output_embeddings().weight, head)


def test_nm_pattern_that_does_not_divide_a_layer_is_refused():
    model = tiny_model("llama")
    with pytest.raises(CTPError, match="divisible by 3"):
        prune_(model, CompressConfig(prune="magnitude", pattern="2:3"), progress=False)


def test_calibration_batch_size_does_not_change_the_masks():
    """Batches of 1 and of 5 sum the activation norms in another order: each gives the
    reference's masks up to near-ties, so they differ from each other only there."""
    ids = calib_ids(nsamples=5, seqlen=32)
    a, b = tiny_model("mistral"), tiny_model("mistral")
    prune_(a, CompressConfig(prune="wanda", calib_batch_size=1), ids, progress=False)
    prune_(b, CompressConfig(prune="wanda", calib_batch_size=5), ids, progress=False)
    for pruned in (a, b):
        assert_masks_follow_reference(pruned, tiny_model("mistral"), ids, sparsity=0.5)
