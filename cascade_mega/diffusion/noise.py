"""Noise levels and absorbing corruption for block diffusion.

Each block of each sequence draws its own t in (t_min, t_max]; with `stratified` sampling the n
draws of a batch are u_i = (U + i) / n mod 1 (systematic sampling: one uniform offset, evenly
spread, then shuffled), which lowers the variance of the 1/t-weighted loss. It is VDM's
low-discrepancy sampler (RADD's "vdm"), not bd3lms' `antithetic_sampling`, which draws one
uniform per stratum, (U_i + i) / n (stratified proper; neither draws antithetic pairs u, 1 - u).
Training draws above `diffusion.t_floor` (`objective.train_range`), validation over the whole
range above it (`objective.valid_range`). Every token of a block is replaced by [MASK]
independently with probability t (linear schedule).

The trainer draws the noise of a whole global batch at once and hands each micro-batch its rows,
so the noise a sample gets does not depend on how the batch is split across micro-batches and
data-parallel ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Noise:
    t: torch.Tensor  # [n, V, L] float64: the noise level of each token's block, per view
    u: torch.Tensor  # [n, V, L] float64 uniforms: token i of view v is masked iff u < t

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
         stratified: bool = True, t_min: float = 0.0, t_max: float = 1.0,
         views: int = 1) -> Noise:
    blocks = seq_len // block_size
    t = sample_t(n * views * blocks, generator, stratified, t_min, t_max).view(n, views, blocks)
    u = torch.rand(n, views, seq_len, generator=generator, dtype=torch.float64)
    return Noise(t.repeat_interleave(block_size, dim=2), u)


def allowed_counts(block: int, t_min: float, t_max: float) -> range:
    """The masked counts k of a block of `block` whose fraction k / block is in [t_min, t_max]."""
    return range(math.ceil(t_min * block - 1e-9), math.floor(t_max * block + 1e-9) + 1)


def resample(noise: Noise, block: int, t_min: float, t_max: float,
             generator: torch.Generator) -> Noise:
    """Clip the realised masked fraction of every block into [t_min, t_max] (bd3lms'
    `_resample_q_xt`, `training.resample`), keeping each block's t (and so its 1/t weight).

    bd3lms redraws an out-of-range block's mask from Bernoulli(t) until its fraction is in range;
    the result is the Bernoulli(t) mask conditioned on its count being allowed. Here an
    out-of-range block draws that count directly from Binomial(block, t) restricted to the
    allowed counts, then masks that many positions uniformly at random (the smallest of its
    uniforms): the same law, in one pass. In-range blocks are left as drawn. The uniforms are
    rewritten so that `u < t` still says which tokens are masked."""
    counts = allowed_counts(block, t_min, t_max)
    n, V, L = noise.t.shape
    t = noise.t.reshape(n, V, L // block, block)[..., 0]  # [n, V, nb]: one t per block
    u = noise.u.reshape(n, V, L // block, block)
    k = (u < t[..., None]).sum(-1)
    out = (k < counts.start) | (k >= counts.stop)
    if not out.any():
        return noise
    tb = t[out]  # [m]
    # host, like every noise tensor (drawn on the host, moved with the batch): log Binomial(B, t)
    ks = torch.arange(block + 1, dtype=torch.float64)
    logp = (math.lgamma(block + 1) - torch.lgamma(ks + 1) - torch.lgamma(block - ks + 1) +
            torch.xlogy(ks, tb[:, None]) + torch.xlogy(block - ks, 1 - tb[:, None]))
    logp[:, [i for i in range(block + 1) if i not in counts]] = -math.inf
    new_k = torch.multinomial(torch.softmax(logp, -1), 1, generator=generator)[:, 0]
    rank = u[out].argsort(-1).argsort(-1).double()  # [m, block] rank of each position's uniform
    kk, tt = new_k[:, None].double(), tb[:, None]
    # masked: the new_k smallest, below t; the others at or above it
    new_u = torch.where(rank < kk, tt * (rank + 1) / (kk + 1),
                        tt + (1 - tt) * (rank - kk + 1) / (block - kk + 1))
    u = u.clone()
    u[out] = new_u
    return Noise(noise.t, u.reshape(n, V, L))


def complement(noise: Noise) -> Noise:
    """Two views from the first: the second masks exactly the tokens the first keeps (t -> 1-t)."""
    t, u = noise.t[:, :1], noise.u[:, :1]
    # view 2 masked iff view 1 unmasked (u >= t), i.e. 1 - u > 1 - t; 1 - t is its noise level
    return Noise(torch.cat([t, 1.0 - t], dim=1), torch.cat([u, 1.0 - u], dim=1))


def corrupt(x0: torch.Tensor, noise: Noise, mask_id: int):
    """Absorbing corruption of every view. x0: [b, L]. Returns (x_t [b, V, L], masked [b, V, L])."""
    masked = noise.u < noise.t
    x = x0[:, None, :].expand_as(masked)
    return torch.where(masked, torch.full_like(x, mask_id), x), masked
