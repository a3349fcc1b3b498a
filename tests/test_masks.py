"""training_mask against the definition in MISSION.md, element by element."""

import pytest
import torch

from cascade_mega.diffusion import training_mask


def definition(L, B, q, k):
    """True = may attend. Written from the prose definition, index by index."""
    q_noisy, k_noisy = q < L, k < L
    qb, kb = (q % L) // B, (k % L) // B
    if q_noisy and k_noisy:
        return qb == kb  # M_BD: same block of x_t
    if q_noisy and not k_noisy:
        return kb < qb  # M_OBC: clean blocks strictly before
    if not q_noisy and not k_noisy:
        return kb <= qb  # M_BC: block-causal on x_0
    return False  # the clean stream never sees x_t


@pytest.mark.parametrize("L,B", [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3), (16, 16), (6, 1)])
def test_training_mask_matches_definition(L, B):
    mask = training_mask(L, B)
    assert mask.shape == (2 * L, 2 * L) and mask.dtype == torch.bool
    for q in range(2 * L):
        for k in range(2 * L):
            assert bool(mask[q, k]) == definition(L, B, q, k), (L, B, q, k)


def test_block_size_one_clean_half_is_causal_and_full_block_is_bidirectional():
    L = 8
    assert torch.equal(training_mask(L, 1)[L:, L:], torch.ones(L, L, dtype=torch.bool).tril())
    assert training_mask(L, L)[:L, :L].all() and not training_mask(L, L)[:L, L:].any()


@pytest.mark.parametrize("L,B", [(8, 3), (0, 1), (8, 0)])
def test_training_mask_rejects_bad_sizes(L, B):
    with pytest.raises(ValueError):
        training_mask(L, B)
