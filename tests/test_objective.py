"""Objectives: B = 1 shifted block diffusion is AR; the NELBO estimator's mean is exact."""

import itertools
import math

import torch

from cascade_mega.diffusion import objective
from helpers import MASK_ID, random_tokens, score, tiny_cfg, tiny_model


def test_shifted_block_size_one_equals_ar_loss(megatron):
    cfg_bd = tiny_cfg("diffusion.block_size=1", "diffusion.shifted_prediction=true")
    cfg_ar = tiny_cfg("diffusion.objective=ar")
    model = tiny_model(cfg_bd, seed=1)
    b, L = 3, 16
    x = random_tokens(b, L + 1, torch.Generator().manual_seed(2))
    tokens, labels = x[:, :L], x[:, 1:]
    ones = torch.ones(b, L)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prep_ar = objective.prepare(tokens, labels, ones, cfg_ar, MASK_ID, gen)
        ce_ar, _ = score(model, prep_ar)
        for t_range in [(1.0, 1.0), (0.0, 1.0)]:
            prep_bd = objective.prepare(tokens, labels, ones, cfg_bd, MASK_ID, gen,
                                        t_range=t_range)
            ce_bd, _ = score(model, prep_bd)
            # Same per-token values: token i from the clean stream's row i-1, i.e. AR's row i-1.
            torch.testing.assert_close(ce_bd, ce_ar[:, :L - 1], rtol=1e-5, atol=1e-6)
        # With every token masked (t = 1) the losses are equal as sums over the same targets.
        prep_bd = objective.prepare(tokens, labels, ones, cfg_bd, MASK_ID, gen, t_range=(1.0, 1.0))
        loss_bd, _ = objective.reduce(score(model, prep_bd)[0], score(model, prep_bd)[1], prep_bd)
        ar_mask = ones.clone()
        ar_mask[:, -1] = 0  # the AR target beyond x0 has no counterpart in x0
        prep_ar = objective.prepare(tokens, labels, ar_mask, cfg_ar, MASK_ID, gen)
        loss_ar, _ = objective.reduce(*score(model, prep_ar), prep_ar)
    assert prep_bd.num_tokens == prep_ar.num_tokens == b * (L - 1)
    torch.testing.assert_close(loss_bd, loss_ar, rtol=1e-5, atol=1e-5)


def exact_nelbo(model, cfg, x0):
    """E_t,mask[(1/t) sum_masked CE] / L by enumerating every mask pattern of every block.

    A block's term depends only on its own mask (other blocks' noisy tokens are invisible to it),
    and for a pattern with k of B positions masked, t ~ U(0, 1] gives the weight
    E[t^k (1-t)^(B-k) / t] = (k-1)! (B-k)! / B!.
    """
    L, B = x0.shape[1], cfg.diffusion.block_size
    total = 0.0
    for blk in range(L // B):
        for pattern in itertools.product([0, 1], repeat=B):
            k = sum(pattern)
            if k == 0:
                continue
            masked = torch.zeros(1, L, dtype=torch.bool)
            masked[0, blk * B:(blk + 1) * B] = torch.tensor(pattern, dtype=torch.bool)
            xt = torch.where(masked, MASK_ID, x0)
            prep = objective.Prepared(
                torch.cat([xt, x0], 1), torch.arange(L).repeat(2)[None],
                objective.AttentionLayout("block_diffusion", L, B),
                objective.ReadOut(torch.arange(L), x0), masked.double(), masked, L)
            ce, _ = score(model, prep)
            weight = math.factorial(k - 1) * math.factorial(B - k) / math.factorial(B)
            total += weight * float((ce.double() * masked).sum())
    return total / L


def test_nelbo_estimate_matches_exact_expectation(megatron):
    cfg = tiny_cfg("data.seq_len=8", "diffusion.block_size=4")
    model = tiny_model(cfg, seed=9)
    L = 8
    x0 = random_tokens(1, L, torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = exact_nelbo(model, cfg, x0)
        copies = 2048
        prep = objective.prepare(x0.expand(copies, L), x0.expand(copies, L),
                                 torch.ones(copies, L), cfg, MASK_ID,
                                 torch.Generator().manual_seed(123))
        ce, _ = score(model, prep)
    per_copy = (ce.double() * prep.weight).sum(1) / L
    mean, se = float(per_copy.mean()), float(per_copy.std() / math.sqrt(copies))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert se < 0.05 * exact  # the check has teeth: a 10% bias would fail
