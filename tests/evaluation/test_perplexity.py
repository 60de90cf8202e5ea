"""Perplexity equals a naive loop written here, with and without a soft prompt.

The naive loop scores one window at a time with float64 log-softmax; ctp batches windows and
reads a prompt from its cache. Their float32 logits agree to ~1e-6, so mean NLLs do and the
perplexities to ``rel=1e-5``; the checks that a number *differs* use gaps far wider than that.
"""

import math

import pytest
import torch

from conftest import calib_ids, tiny_model
from ctp.errors import CTPError
from ctp.evaluation.perplexity import perplexity_of_ids
from ctp.lm import windows_of


def naive_ppl(model, ids, seqlen, prompt=None):
    """exp of the mean over windows of each window's mean next-token NLL, one token at a time."""
    window_means = []
    for w in range(ids.numel() // seqlen):
        window = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
        with torch.no_grad():
            if prompt is None:
                logits = model(input_ids=window).logits[0]
                offset = 0
            else:
                emb = model.get_input_embeddings()(window)
                logits = model(inputs_embeds=torch.cat([prompt.unsqueeze(0), emb], 1)).logits[0]
                offset = prompt.shape[0]
        total = 0.0
        for t in range(1, seqlen):  # predict token t from position offset + t - 1
            logp = torch.log_softmax(logits[offset + t - 1].double(), dim=-1)
            total -= logp[window[0, t]].item()
        window_means.append(total / (seqlen - 1))
    return math.exp(sum(window_means) / len(window_means))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_matches_naive_loop(arch):
    model = tiny_model(arch)
    ids = calib_ids(1, 200, seed=3).flatten()
    got = perplexity_of_ids(model, ids, seqlen=48, batch_size=3)
    assert got.windows == 4 and got.tokens_scored == 4 * 47  # the tail of 8 tokens is dropped
    assert got.ppl == pytest.approx(naive_ppl(model, ids, 48), rel=1e-5)


def test_prompt_positions_are_not_scored_and_targets_are_the_same():
    model = tiny_model("llama")
    ids = calib_ids(1, 130, seed=4).flatten()
    prompt = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
    got = perplexity_of_ids(model, ids, seqlen=64, prompt=prompt, batch_size=2)
    assert got.tokens_scored == 2 * 63 and got.virtual_tokens == 5
    assert got.ppl == pytest.approx(naive_ppl(model, ids, 64, prompt), rel=1e-5)
    plain = perplexity_of_ids(model, ids, seqlen=64)
    assert got.ppl != pytest.approx(plain.ppl, rel=1e-6)  # the prompt does change the numbers


def test_too_short_and_too_long():
    model = tiny_model("llama")
    with pytest.raises(CTPError, match="too short"):
        perplexity_of_ids(model, torch.arange(10), seqlen=20)
    with pytest.raises(CTPError, match="context"):
        perplexity_of_ids(model, torch.arange(1000) % 50, seqlen=250,
                          prompt=torch.zeros(10, model.config.hidden_size))


def test_max_windows_scores_the_first_windows():
    """The published C4 protocol scores the first 256 windows: max_windows takes the first N."""
    model = tiny_model("llama")
    ids = calib_ids(1, 5 * 48, seed=3).flatten()
    got = perplexity_of_ids(model, ids, 48, max_windows=2)
    assert got.windows == 2 and got.ppl == pytest.approx(naive_ppl(model, ids[:96], 48), rel=1e-5)
    assert got.ppl != pytest.approx(naive_ppl(model, ids[96:192], 48), rel=1e-3)


def test_windows_do_not_overlap():
    w = windows_of(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_official_code_averaging_would_report_a_different_number():
    """The paper's code divides the summed NLL of the L-1 real targets by L+n-1 positions,
    turning a true perplexity p into p ** ((L-1)/(L+n-1)). ctp must report p itself."""
    model = tiny_model("llama")
    seqlen, n = 64, 10
    ids = calib_ids(1, 3 * seqlen, seed=5).flatten()
    prompt = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.1
    honest = perplexity_of_ids(model, ids, seqlen, prompt=prompt)
    assert honest.ppl == pytest.approx(naive_ppl(model, ids, seqlen, prompt), rel=1e-5)
    assert honest.tokens_scored == 3 * (seqlen - 1) and honest.virtual_tokens == n
    # the official code's number, computed independently: the same summed NLL over L + n - 1
    with torch.no_grad():
        total = 0.0
        for w in ids.view(3, seqlen):
            emb = model.get_input_embeddings()(w[None])
            logits = model(inputs_embeds=torch.cat([prompt[None], emb], 1)).logits[0, n:]
            total += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
    official = math.exp(total / (3 * (seqlen + n - 1)))
    assert official < honest.ppl * 0.95 and honest.ppl != pytest.approx(official, rel=1e-3)
