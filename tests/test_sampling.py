"""`sample` against exact float64 distributions: what it draws, its confidences, its knobs."""

import pytest
import torch

from cascade_mega.inference.sampling import Sampling, sample


def _draws(logits, s, n, seed=0):
    """n tokens drawn from one row of logits, in chunks."""
    gen = torch.Generator().manual_seed(seed)
    out = [sample(logits.expand(1000, -1), s, gen)[0] for _ in range(n // 1000)]
    return torch.cat(out)


def test_draws_follow_softmax_of_logits_over_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, generator=g) * 2
    s = Sampling(greedy=False, temperature=0.7)
    tokens = _draws(logits, s, 40_000)
    expected = (logits.double() / 0.7).softmax(-1)
    freq = torch.bincount(tokens, minlength=64).double() / len(tokens)
    assert 0.5 * (freq - expected).abs().sum() < 0.02  # total variation; sampling noise ~0.01
    drawn, confidence = sample(logits.expand(5, -1), s, torch.Generator().manual_seed(2))
    assert torch.allclose(confidence.double(), expected[drawn], rtol=1e-5)


def test_a_long_tail_keeps_its_mass():
    """One token of probability ~0.998 and 8191 of ~2.4e-7 each: the tail is drawn ~0.2 % of
    the time, as its mass says."""
    logits = torch.zeros(8192)
    logits[0] = 15.2
    tail = 1 - float(logits.double().softmax(-1)[0])
    assert 1e-3 < tail < 3e-3
    tokens = _draws(logits, Sampling(greedy=False), 100_000, seed=3)
    hits = int((tokens != 0).sum())
    expected = tail * len(tokens)
    assert abs(hits - expected) < 4 * expected ** 0.5, (hits, expected)


@pytest.mark.parametrize("knob", ["top_k", "top_p"])
def test_top_k_and_top_p_restrict_the_support(knob):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(32, generator=g)
    probs, order = logits.double().softmax(-1).sort(descending=True)
    if knob == "top_k":
        s, keep = Sampling(greedy=False, top_k=5), 5
    else:  # the smallest prefix of the sorted distribution holding at least 0.6
        s = Sampling(greedy=False, top_p=0.6)
        keep = int((probs.cumsum(0) < 0.6).sum()) + 1
    tokens = _draws(logits, s, 20_000, seed=5)
    assert set(tokens.tolist()) == set(order[:keep].tolist())
    freq = torch.bincount(tokens, minlength=32).double()[order[:keep]] / len(tokens)
    assert torch.allclose(freq, probs[:keep] / probs[:keep].sum(), atol=0.015)


def test_greedy_and_seeds():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 100, generator=g)
    tokens, confidence = sample(logits, Sampling(), None)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(confidence, logits.softmax(-1).max(-1).values)
    s = Sampling(greedy=False)
    a = sample(logits, s, torch.Generator().manual_seed(7))[0]
    b = sample(logits, s, torch.Generator().manual_seed(7))[0]
    c = sample(logits, s, torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
