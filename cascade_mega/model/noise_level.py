"""Time conditioning (`model.time_conditioning`): the noise level of each row's block, embedded and
added to that row's token embedding.

Design choices:
- What is embedded: the masked share of the row's block, the fraction of its positions that are
  [MASK] in the input (the noise level its state shows; its expectation in training is the
  block's t). One function, `diffusion/masks.py: masked_share`, gives it in training, evaluation and decoding, so the
  embedding reads the same quantity everywhere: in decoding the block's t is not known, in
  evaluation a block is masked by a count (and its tail), and for the absorbing process the
  optimal denoiser is a function of x_t alone (RADD), so a level computed from x_t loses nothing.
  (SEDD conditions on the total noise of the drawn t; with B positions the share is within a few
  1/sqrt(B) of t.) A clean row (the x_0 stream, the auxiliary AR stream, a committed block in
  decoding) has share 0: it is what a block with nothing masked is, so it needs no second rule.
- How: DiT's / SEDD's timestep embedder, sinusoidal features of 1000 t (256 of them, periods up
  to 10^4) through Linear - SiLU - Linear to the hidden size, added to the word embedding before
  the first layer (one addition per row; the layers stay megatron-core's own). The last linear
  starts at zero, so a time-conditioned model starts as the same function as an unconditioned one
  with the same seed and can only learn to use t (RADD: for the absorbing process the optimum
  does not depend on t; the ablation measures whether the network agrees).
- Where: the first pipeline stage only (where the embedding is). Under sequence parallel each
  tensor-parallel rank adds its slice of the sequence, and megatron-core all-reduces the
  gradients of parameters marked `sequence_parallel` (as for a norm); under context parallel the
  noise levels are split with the rows (`objective._split_for_context`).
"""

from __future__ import annotations

import math

import torch

FREQUENCIES = 256


def sinusoidal(t: torch.Tensor, dim: int = FREQUENCIES, max_period: float = 1e4) -> torch.Tensor:
    """[...] noise levels in [0, 1] -> [..., dim] float32 features of 1000 t."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = 1000.0 * t.float()[..., None] * freqs
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


class NoiseLevelEmbedding(torch.nn.Module):
    """t per row [b, S] -> an addition to the embeddings, [S, b, hidden] (megatron's layout)."""

    def __init__(self, hidden: int, init_std: float, seed: int, dtype=torch.float32):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(FREQUENCIES, hidden, dtype=dtype),
                                       torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden, dtype=dtype))
        # a host generator on purpose: the same weights on every rank and device (copied in)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            first, last = self.mlp[0], self.mlp[2]
            first.weight.copy_(torch.randn(first.weight.shape, generator=g) * init_std)
            first.bias.zero_()
            last.weight.zero_()
            last.bias.zero_()
        for p in self.parameters():
            p.sequence_parallel = True  # gradients summed over tensor-parallel ranks under SP

    def forward(self, noise_levels: torch.Tensor) -> torch.Tensor:
        features = sinusoidal(noise_levels.t()).to(self.mlp[0].weight.dtype)
        return self.mlp(features)
