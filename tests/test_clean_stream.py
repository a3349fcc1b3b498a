"""The clean stream never sees x_t: changing x_t leaves every clean-half output unchanged."""

import torch

from cascade_mega.diffusion import AttentionLayout
from helpers import MASK_ID, hidden, random_tokens, tiny_cfg, tiny_model


def test_changing_x_t_never_changes_clean_stream(megatron):
    cfg = tiny_cfg()
    model = tiny_model(cfg, seed=3)
    L, B, b = 16, 4, 3
    gen = torch.Generator().manual_seed(11)
    x0 = random_tokens(b, L, gen)
    pos = torch.arange(L).repeat(2).expand(b, -1)
    layout = AttentionLayout("block_diffusion", L, B)
    xt_a = torch.where(torch.rand(b, L, generator=gen) < 0.5, MASK_ID, x0)
    xt_b = random_tokens(b, L, gen)  # an entirely different noisy half
    h_a = hidden(model, torch.cat([xt_a, x0], 1), pos, layout)
    h_b = hidden(model, torch.cat([xt_b, x0], 1), pos, layout)
    assert torch.equal(h_a[L:], h_b[L:])
    assert not torch.allclose(h_a[:L], h_b[:L])  # the noisy half does depend on x_t


def test_noisy_block_sees_only_its_block_and_clean_prefix(megatron):
    cfg = tiny_cfg()
    model = tiny_model(cfg, seed=4)
    L, B = 16, 4
    gen = torch.Generator().manual_seed(5)
    x0 = random_tokens(1, L, gen)
    pos = torch.arange(L).repeat(2)[None]
    layout = AttentionLayout("block_diffusion", L, B)
    xt = torch.where(torch.rand(1, L, generator=gen) < 0.5, MASK_ID, x0)
    base = hidden(model, torch.cat([xt, x0], 1), pos, layout)
    # Change clean block 2: noisy blocks 0..2 must not move, noisy block 3 must.
    x0_changed = x0.clone()
    x0_changed[0, 8:12] = (x0_changed[0, 8:12] + 1) % MASK_ID
    moved = hidden(model, torch.cat([xt, x0_changed], 1), pos, layout)
    assert torch.equal(base[:12], moved[:12])
    assert not torch.allclose(base[12:16], moved[12:16])
