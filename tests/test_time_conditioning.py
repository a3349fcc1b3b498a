"""Time conditioning (model/noise_level.py).

The embedder is checked against the formula written out again here in float64 and fed to the
same model as its first layer's input; the rows' noise levels against the noise the objective
drew. (The `tweedie` step a score-entropy model decodes with: tests/test_sampling.py. Cached
decoding of a time-conditioned score-entropy model equals the uncached one:
tests/test_generate.py. TP = 2 with sequence parallel and CP = 2: tests/test_torchrun.py.)
"""

import math

import pytest
import torch

from cascade_mega.diffusion import objective
from cascade_mega.diffusion.base import noise_generator
from cascade_mega.model.gpt import predict_and_score
from helpers import MASK_ID, score, tiny_cfg, tiny_model

TC = "model.time_conditioning=true"


def _reference_addition(embedder, t: torch.Tensor) -> torch.Tensor:
    """DiT's timestep embedder written out in float64: [b, S] -> [S, b, h]."""
    half = 128
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float64) / half)
    angle = 1000 * t.double().t()[..., None] * freqs
    x = torch.cat([angle.cos(), angle.sin()], -1)
    first, last = embedder.mlp[0], embedder.mlp[2]
    h = x @ first.weight.double().t() + first.bias.double()
    h = h * torch.sigmoid(h)
    return h @ last.weight.double().t() + last.bias.double()


def _prep(cfg, seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK_ID, (b, cfg.data.seq_len), generator=g)
    return objective.prepare(tokens, tokens, torch.ones_like(tokens), cfg, MASK_ID,
                             noise_generator(seed, "tc"), eod_id=0)


def test_noise_levels_are_added_to_each_rows_embedding(megatron):
    cfg = tiny_cfg(TC)
    model = tiny_model(cfg, seed=1)
    plain = tiny_model(tiny_cfg(), seed=1)
    prep = _prep(cfg)
    # the last layer starts at zero: the conditioned model starts as the unconditioned one
    assert torch.equal(score(model, prep)[0], score(plain, prep)[0])
    with torch.no_grad():
        for p in model.noise_embedding.parameters():
            p.normal_(0, 0.3)
    got = score(model, prep)[0]
    embedder = model.noise_embedding
    added = _reference_addition(embedder, prep.noise_levels).float()
    first_input = model.embedding(input_ids=prep.input_ids, position_ids=prep.position_ids)
    del model.noise_embedding  # the same model, fed the reference sum as its first input
    want = model(prep.input_ids, prep.position_ids, prep.layout, decoder_input=first_input + added,
                 output_processor=predict_and_score,
                 output_processor_context=prep.readout)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - score(plain, prep)[0]).abs().max() > 1e-2  # the levels change the output
    model.noise_embedding = embedder
    with pytest.raises(ValueError, match="noise level of every row"):
        model(prep.input_ids, prep.position_ids, prep.layout)


@pytest.mark.parametrize("extra", [(), ("diffusion.views=2", "diffusion.complementary=true",
                                        "diffusion.ar_loss_weight=0.5")])
def test_rows_carry_their_blocks_noise_level_and_clean_rows_zero(extra):
    cfg = tiny_cfg(TC, *extra)
    L, B = cfg.data.seq_len, cfg.diffusion.block_size
    prep = _prep(cfg, seed=3)
    V = cfg.diffusion.views
    levels = prep.noise_levels
    assert levels.shape == prep.input_ids.shape and levels.dtype == torch.float32
    for v in range(V):  # each block's [MASK] share (masked_share's own test: test_eval)
        view = (prep.input_ids[:, v * L:(v + 1) * L] == MASK_ID).float().view(-1, L // B, B)
        torch.testing.assert_close(levels[:, v * L:(v + 1) * L],
                                   view.mean(2).repeat_interleave(B, 1))
        # one level per block
        assert torch.equal(levels[:, v * L:(v + 1) * L:B].repeat_interleave(B, 1),
                           levels[:, v * L:(v + 1) * L])
    assert torch.equal(levels[:, V * L:], torch.zeros_like(levels[:, V * L:]))  # x_0 (and AR)
    if V == 2:
        torch.testing.assert_close(levels[:, L:2 * L], 1 - levels[:, :L])
    # a context-parallel rank keeps the levels of its rows
    rank = objective.prepare(prep.input_ids[:, :L], prep.input_ids[:, :L],
                             torch.ones_like(prep.input_ids[:, :L]), tiny_cfg(TC), MASK_ID,
                             noise_generator(3, "tc"), context=(1, 2))
    whole = objective.prepare(prep.input_ids[:, :L], prep.input_ids[:, :L],
                              torch.ones_like(prep.input_ids[:, :L]), tiny_cfg(TC), MASK_ID,
                              noise_generator(3, "tc"))
    held = whole.layout.split_for_context(1, 2).rows()
    assert torch.equal(rank.noise_levels, whole.noise_levels[:, held])
    assert objective.prepare(prep.input_ids[:, :L], prep.input_ids[:, :L],
                             torch.ones_like(prep.input_ids[:, :L]), tiny_cfg(), MASK_ID,
                             noise_generator(3, "tc")).noise_levels is None
