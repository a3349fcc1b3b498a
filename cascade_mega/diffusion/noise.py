"""Noise levels and absorbing corruption for block diffusion.

Each block of each sequence draws its own t in (t_min, t_max]; with `stratified` sampling the n
draws of a batch are u_i = (U + i) / n mod 1 (one uniform offset, evenly spread, then shuffled:
BD3-LM's antithetic sampling), which lowers the variance of the 1/t-weighted loss. Every token of a
block is replaced by [MASK] independently with probability t (linear schedule).

The trainer draws the noise of a whole global batch at once and hands each micro-batch its rows,
so the noise a sample gets does not depend on how the batch is split across micro-batches and
data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Noise:
    t: torch.Tensor  # [n, L] float64: the noise level of each token's block
    u: torch.Tensor  # [n, L] float64 uniforms: token i is masked iff u < t

    def rows(self, start: int, stop: int) -> "Noise":
        return Noise(self.t[start:stop], self.u[start:stop])


def sample_t(n: int, generator: torch.Generator, stratified: bool = True, t_min: float = 0.0,
             t_max: float = 1.0) -> torch.Tensor:
    """n noise levels in (t_min, t_max], float64 for exact 1/t weights."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if stratified:
        u = ((u[:1] + torch.arange(n, dtype=torch.float64)) / n) % 1.0
        u = u[torch.randperm(n, generator=generator)]
    return t_max - (t_max - t_min) * u  # u in [0, 1) -> t in (t_min, t_max]


def draw(n: int, seq_len: int, block_size: int, generator: torch.Generator,
         stratified: bool = True, t_min: float = 0.0, t_max: float = 1.0) -> Noise:
    blocks = seq_len // block_size
    t = sample_t(n * blocks, generator, stratified, t_min, t_max).view(n, blocks)
    u = torch.rand(n, seq_len, generator=generator, dtype=torch.float64)
    return Noise(t.repeat_interleave(block_size, dim=1), u)


def corrupt(x0: torch.Tensor, noise: Noise, mask_id: int):
    """Absorbing corruption. x0: [b, L]. Returns (x_t, masked [b, L] bool)."""
    masked = noise.u < noise.t
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked
