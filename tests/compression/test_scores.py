import torch

from ctp.compression.scores import InputNorms, magnitude_score, wanda_score


def test_input_norms_is_mean_over_sequences_of_squared_norms():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 5, 7, generator=gen) for b in (3, 1, 4)]
    acc = InputNorms(7)
    for b in batches:
        acc.update(b)
    everything = torch.cat(batches)  # [8, 5, 7]
    expected = everything.pow(2).sum(dim=1).mean(dim=0)
    torch.testing.assert_close(acc.value, expected, rtol=1e-6, atol=1e-6)
    assert acc.sequences == 8


def test_scores():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    assert torch.equal(magnitude_score(w), w.abs())
    norms = torch.tensor([4.0, 9.0])
    torch.testing.assert_close(wanda_score(w, norms), torch.tensor([[2.0, 6.0], [6.0, 1.5]]))
