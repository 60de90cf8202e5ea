import pytest
import torch

from ctp.compression.masks import matrix_mask, nm_mask, row_mask
from ctp.errors import CTPError


def score(rows=16, cols=48, seed=0):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_row_mask_prunes_the_lowest_k_of_every_row(sparsity):
    s = score()
    mask = row_mask(s, sparsity)
    k = int(s.shape[1] * sparsity)
    assert (mask.sum(dim=1) == k).all()
    for r in range(s.shape[0]):  # naive: sort the row and compare sets
        lowest = set(sorted(range(s.shape[1]), key=lambda j: s[r, j].item())[:k])
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == lowest


def test_matrix_mask_is_one_threshold_per_matrix():
    s = score()
    mask = matrix_mask(s, 0.5)
    assert mask.sum() == int(s.numel() * 0.5)
    assert s[mask].max() < s[~mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (5, 16)])
def test_nm_mask_zeroes_n_lowest_in_every_block(n, m):
    s = score(cols=m * 6)
    mask = nm_mask(s, n, m)
    blocks_mask = mask.view(s.shape[0], -1, m)
    blocks = s.view(s.shape[0], -1, m)
    assert (blocks_mask.sum(dim=2) == n).all()
    kept_min = torch.where(blocks_mask, torch.inf, blocks).amin(dim=2)
    pruned_max = torch.where(blocks_mask, blocks, -torch.inf).amax(dim=2)
    assert (pruned_max < kept_min).all()


def test_nm_mask_refuses_width_not_divisible():
    with pytest.raises(CTPError, match="divisible by 4"):
        nm_mask(score(cols=10), 2, 4)


def test_ties_are_broken_by_position():
    s = torch.zeros(2, 8)
    assert row_mask(s, 0.5)[0].tolist() == [True] * 4 + [False] * 4
