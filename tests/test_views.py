"""Shared clean stream: V noisy views in one (V+1)L pass equal V separate 2L passes.

Loss and every parameter gradient are compared, through the real megatron model.
"""

import pytest
import torch

from cascade_mega.diffusion import objective
from cascade_mega.diffusion.noise import Noise
from helpers import MASK_ID, random_tokens, score, tiny_cfg, tiny_model


def _loss_and_grads(model, prep):
    model.zero_grad()
    ce, correct = score(model, prep)
    loss, _ = objective.reduce(ce, correct, prep)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("complementary", [True, False])
def test_shared_stream_equals_separate_passes(megatron, shifted, complementary):
    views = ["diffusion.views=2", f"diffusion.complementary={str(complementary).lower()}",
             f"diffusion.shifted_prediction={str(shifted).lower()}"]
    cfg_v = tiny_cfg(*views)
    cfg_1 = tiny_cfg(f"diffusion.shifted_prediction={str(shifted).lower()}")
    model = tiny_model(cfg_v, seed=6)
    model.train()
    b, L = 3, 16
    gen = torch.Generator().manual_seed(8)
    tokens = random_tokens(b, L, gen)
    ones = torch.ones(b, L)
    noise = objective.draw_noise(cfg_v, b, gen)
    if complementary:  # every token is a target in exactly one of the two views
        masked = noise.u < noise.t
        assert bool((masked[:, 0] ^ masked[:, 1]).all())
    shared = objective.prepare(tokens, tokens, ones, cfg_v, MASK_ID, noise)
    assert shared.input_ids.shape == (b, 3 * L)
    loss_v, grads_v = _loss_and_grads(model, shared)
    loss_sep, grads_sep = 0.0, None
    for v in range(2):
        one = Noise(noise.t[:, v:v + 1], noise.u[:, v:v + 1])
        prep = objective.prepare(tokens, tokens, ones, cfg_1, MASK_ID, one)
        assert prep.input_ids.shape == (b, 2 * L)
        loss, grads = _loss_and_grads(model, prep)
        loss_sep = loss_sep + loss / 2  # the shared loss averages the two views' estimates
        grads_sep = {n: g / 2 for n, g in grads.items()} if grads_sep is None else \
            {n: grads_sep[n] + g / 2 for n, g in grads.items()}
    torch.testing.assert_close(loss_v, loss_sep, rtol=1e-5, atol=1e-5)
    for name in grads_v:
        torch.testing.assert_close(grads_v[name], grads_sep[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_dense_and_tiled_kernels_agree_in_the_model(megatron):
    cfg_t = tiny_cfg("model.attention_kernel=tiled")
    cfg_d = tiny_cfg("model.attention_kernel=dense")
    b, L = 2, 16
    gen = torch.Generator().manual_seed(3)
    tokens = random_tokens(b, L, gen)
    prep = objective.prepare(tokens, tokens, torch.ones(b, L), cfg_t, MASK_ID, gen)
    ce_t, _ = score(tiny_model(cfg_t, seed=2), prep)
    ce_d, _ = score(tiny_model(cfg_d, seed=2), prep)
    torch.testing.assert_close(ce_t, ce_d, rtol=1e-5, atol=1e-5)
