"""Score entropy (`model/scores.py`) against SEDD's loss as written, in float64: RADD's identity
(scores a x softmax: the DSE is the 1/t-weighted cross-entropy), the bound it gives otherwise,
and the stable form the model computes. (Its estimate against exact enumeration on a tiny model:
tests/test_objective.py; vocabulary-parallel at TP = 2: tests/test_torchrun.py.)"""

import math

import torch

from cascade_mega.model import scores


def _draws(n=4000, V=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=gen, dtype=torch.float64) * 3
    x0 = torch.randint(0, V, (n,), generator=gen)
    t = 10 ** -(3 * torch.rand(n, generator=gen, dtype=torch.float64))  # 1e-3 .. 1
    t = t.clamp(max=1 - 1e-6)
    return logits, x0, t


def _ce(logits, x0):
    return torch.logsumexp(logits, 1) - logits.gather(1, x0[:, None])[:, 0]


def test_radd_identity_normalised_scores_give_the_weighted_cross_entropy():
    logits, x0, t = _draws()
    a = (1 - t) / t
    dse = scores.dse_three_terms(a[:, None] * logits.softmax(1), x0, t)
    ce = _ce(logits, x0) / t
    assert torch.allclose(dse, ce, rtol=1e-10, atol=1e-10), float((dse - ce).abs().max())


def test_unnormalised_scores_bound_the_normalised_cross_entropy_from_above():
    logits, x0, t = _draws(seed=1)
    gen = torch.Generator().manual_seed(2)
    scale = torch.exp(torch.randn(len(t), 1, generator=gen, dtype=torch.float64) * 2)
    a = (1 - t) / t
    dse = scores.dse_three_terms(scale * a[:, None] * logits.softmax(1), x0, t)
    ce = _ce(logits, x0) / t
    assert bool((dse >= ce - 1e-9 * ce.abs()).all())
    assert float((dse - ce).min()) >= -1e-9 and float((dse - ce).max()) > 1.0  # not all equal


def test_the_models_parameterisation_in_the_stable_form_equals_the_three_terms():
    """log s_y = logit_y + log a - log(V - 1): (1/t)[CE + g(Z / a)] with the module's `excess`
    equals SEDD's three-term DSE, and needs no time input (g depends on the logits only)."""
    logits, x0, t = _draws(seed=3)
    V = logits.shape[1]
    a = (1 - t) / t
    s = torch.exp(logits + a.log()[:, None] - math.log(V - 1))
    reference = scores.dse_three_terms(s, x0, t)
    lse = scores.vocab_parallel_logsumexp(logits)  # one process: the plain log-sum-exp
    assert torch.allclose(lse, torch.logsumexp(logits, 1), rtol=0, atol=1e-12)
    stable = (_ce(logits, x0) + scores.excess(lse, math.log(V - 1))) / t
    assert torch.allclose(stable, reference, rtol=1e-10, atol=1e-10), \
        float(((stable - reference) / reference).abs().max())
    # at Z / a = 1 (logits normalised to log(V - 1)) the excess vanishes
    normal = logits - torch.logsumexp(logits, 1, keepdim=True) + math.log(V - 1)
    assert float(scores.excess(torch.logsumexp(normal, 1), math.log(V - 1)).abs().max()) < 1e-12
