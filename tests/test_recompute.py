"""`model.recompute=full`: the layers rerun in backward, and the gradients do not change."""

import torch

from cascade_mega.bench.memory import PeakMemory
from cascade_mega.diffusion import objective
from helpers import MASK_ID, random_tokens, score, tiny_cfg, tiny_model


def _grads_and_held(cfg):
    model = tiny_model(cfg)
    model.train()
    b, L = 2, cfg.data.seq_len
    tokens = random_tokens(b, L, torch.Generator().manual_seed(5))
    prep = objective.prepare(tokens, tokens, torch.ones(b, L), cfg, MASK_ID,
                             torch.Generator().manual_seed(6))
    with PeakMemory() as mem:
        loss, _ = objective.reduce(*score(model, prep), prep)
        held = mem.current
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, held


def test_full_recompute_gives_the_same_gradients_and_keeps_less(megatron):
    args = ["train.precision=fp32", "model.num_layers=3", "data.seq_len=32"]
    plain, held_plain = _grads_and_held(tiny_cfg(*args))
    recomputed, held_recomputed = _grads_and_held(tiny_cfg(*args, "model.recompute=full"))
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5)
    assert held_recomputed < 0.5 * held_plain
