"""`sample` against exact float64 distributions: what it draws, its confidences, its knobs; and
two unmasking policies against their rules written out again here: `tweedie`'s unmasking
probability against the closed form 1 - (s / t)^R in float64, `entropy`'s choice against
EB-sampler's rule (the largest sorted prefix with sum H - max H <= gamma)."""

import math
import random

import pytest
import torch

from cascade_mega.inference.policies import Policy, tweedie_unmask
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


def _unmask_reference(logits, step, steps):
    """1 - (s / t)^R per row in float64, R = sum_y exp(logit_y) / (ids allowed), from Python
    floats: the survival of a masked position under the reverse rate R / u from t down to s."""
    t, s = 1 - step / steps, 1 - (step + 1) / steps
    out = []
    for row in logits.tolist():
        allowed = [x for x in row if x != float("-inf")]
        mass = math.fsum(math.exp(x) for x in allowed) / len(allowed)
        out.append(1 - (s / t) ** mass)
    return torch.tensor(out, dtype=torch.float64)


def test_tweedie_unmasks_with_the_exact_survival_of_the_scores():
    """From random logits ([MASK] and a few other ids never predicted): P(unmask) = 1 - (s / t)^R
    at every step of K; normalised scores (R = 1) and a cross-entropy model give MDLM's
    (t - s) / t; at R = 2 from t = 1 to 0.75 it is 0.4375 (SEDD's first-order step: 0.5); the last
    step decides everything. Results on the host."""
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    v, steps = 48, 4
    logits = torch.randn(7, v, generator=g) * 2 + torch.randn(7, 1, generator=g)
    logits[:, -1] = float("-inf")
    logits[torch.rand(7, v, generator=g) < 0.1] = float("-inf")
    normalised = logits.log_softmax(-1) + torch.isfinite(logits).sum(-1, keepdim=True).log()
    for step in range(steps):
        t, s = 1 - step / steps, 1 - (step + 1) / steps
        got = tweedie_unmask(logits, step, steps, True)
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, _unmask_reference(logits, step, steps), rtol=1e-5,
                                   atol=1e-7)  # float32 logits, read in float64
        mdlm = torch.full((7,), (t - s) / t, dtype=torch.float64)
        torch.testing.assert_close(tweedie_unmask(normalised, step, steps, True), mdlm)
        torch.testing.assert_close(tweedie_unmask(logits, step, steps, False).double(), mdlm)
    two = torch.full((1, 4), math.log(2.0), dtype=torch.float64)  # R = 2
    assert abs(float(tweedie_unmask(two, 0, steps, True)[0]) - 0.4375) < 1e-12
    assert torch.equal(tweedie_unmask(logits - 200, steps - 1, steps, True),
                       torch.ones(7, dtype=torch.float64))


def _eb_reference(entropy, rank, gamma):
    """EB-sampler's rule written out: positions sorted by rank (higher first, ties by index), the
    largest k whose first k entropies sum to at most gamma more than their largest."""
    order = sorted(range(len(rank)), key=lambda i: -rank[i])
    h = [entropy[i] for i in order]
    k = max(k for k in range(1, len(h) + 1) if math.fsum(h[:k]) - max(h[:k]) <= gamma)
    return order[:k]


@pytest.mark.parametrize("entropy, gamma, want", [
    ([1.7], 0.1, [0]),  # one position: always decided
    ([0.01, 0.02, 0.01, 0.03, 0.02], 0.1, [0, 1, 2, 3, 4]),  # all within the bound
    ([0.5] * 5, 1.0, [0, 1, 2]),  # ties, and the bound met exactly: 0.5 + 0.5 <= 1
    ([2.0, 0.25, 0.25, 0.5, 0.125], 0.75, [0, 1, 2]),  # the largest first: it does not count
    ([0.0, 0.75, 0.5, 0.125], 0.5, [0, 1, 2]),  # 0.75 the largest: 0 + 0.5 fits, + 0.125 not
])
def test_entropy_policy_is_eb_samplers_rule_on_chosen_entropies(entropy, gamma, want):
    """Confidence ranks the positions in index order (ties included: all equal)."""
    confidence = torch.full((len(entropy),), 0.3)
    entropy = torch.tensor(entropy)
    got = Policy("entropy", steps=100, bound=gamma).choose(confidence, 0, entropy=entropy)
    assert got.tolist() == want == _eb_reference(entropy.tolist(), confidence.tolist(), gamma)


def test_entropy_policy_is_eb_samplers_rule_on_random_entropies():
    """300 random cases: up to 12 positions, entropies in [0, 3) nats (a third of them on a
    0.25 grid, so ties and sums landing on gamma occur), ranked by confidence or by entropy."""
    seed = int(torch.randint(1 << 30, ()))
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    sizes = []
    for case in range(300):
        m, gamma = rng.randint(1, 12), rng.choice([0.25, 0.5, 1.0, rng.uniform(0.05, 4)])
        entropy = torch.rand(m, generator=g) * 3
        if case % 3 == 0:
            entropy = (entropy * 4).floor() / 4
        confidence = torch.rand(m, generator=g)
        rank = -entropy if case % 2 else None
        policy = Policy("entropy", steps=100, bound=gamma)
        got = policy.choose(confidence, 0, entropy=entropy, rank=rank).tolist()
        want = _eb_reference(entropy.tolist(), (confidence if rank is None else rank).tolist(),
                             gamma)
        assert got == want, (seed, case)
        sizes.append(len(got))
        assert len(policy.choose(confidence, 99, entropy=entropy, rank=rank)) == m  # the cap
    assert 1 in sizes and max(sizes) >= 6  # one at a time and many at once both occur
