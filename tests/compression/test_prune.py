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


def reference_wanda_masks(model, ids, sparsity=None, nm=None):
    """Naive sequential Wanda: for each layer in turn, run the WHOLE model (earlier layers
    already pruned) with hooks recording every Linear input of that layer, score
    |W| * ||X_j|| over all tokens, and zero the lowest k of each row (or n of each m-block)."""
    model = copy.deepcopy(model)
    masks = {}
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        inputs = linear_inputs(model, layer, ids)
        for n, lin in linears.items():
            x = inputs[n]
            score = lin.weight.abs() * x.norm(dim=0)  # ||X_j||_2 over all tokens
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
            masks[f"{prefix}.{i}.{n}"] = mask
            with torch.no_grad():
                lin.weight[mask] = 0
    return masks


def assert_masks_match(model, reference, max_diff_fraction=0.0):
    for name, lin in decoder_linears(model).items():
        got = lin.weight == 0
        diff = (got != reference[name]).float().mean().item()
        assert diff <= max_diff_fraction, f"{name}: {diff:.2%} of the mask differs"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_wanda_unstructured_equals_naive_reference(arch):
    model = tiny_model(arch)
    ids = calib_ids(nsamples=6, seqlen=32)
    reference = reference_wanda_masks(model, ids, sparsity=0.5)
    prune_(model, CompressConfig(prune="wanda", sparsity=0.5, calib_batch_size=4), ids, progress=False)
    assert_masks_match(model, reference)
    for name, lin in decoder_linears(model).items():
        zeros_per_row = (lin.weight == 0).sum(dim=1)
        assert (zeros_per_row == int(lin.in_features * 0.5)).all(), name


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_wanda_nm_equals_reference_and_every_block_has_n_zeros(arch, pattern):
    n, m = map(int, pattern.split(":"))
    model = tiny_model(arch)
    ids = calib_ids(nsamples=4, seqlen=32)
    reference = reference_wanda_masks(model, ids, nm=(n, m))
    prune_(model, CompressConfig(prune="wanda", pattern=pattern), ids, progress=False)
    assert_masks_match(model, reference)
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
    ids = calib_ids(nsamples=5, seqlen=32)
    a, b = tiny_model("mistral"), tiny_model("mistral")
    prune_(a, CompressConfig(prune="wanda", calib_batch_size=1), ids, progress=False)
    prune_(b, CompressConfig(prune="wanda", calib_batch_size=5), ids, progress=False)
    for (name, la), lb in zip(decoder_linears(a).items(), decoder_linears(b).values()):
        assert torch.equal(la.weight == 0, lb.weight == 0), name
