"""Noise levels and absorbing corruption for block diffusion.

Each block of each sequence draws its own t in (t_min, t_max]; with `stratified` sampling the n
draws of a batch are u_i = (U + i) / n mod 1 (one uniform offset, evenly spread: BD3-LM's
antithetic sampling), which lowers the variance of the 1/t-weighted loss. Every token of a block is
replaced by [MASK] independently with probability t (linear schedule).
"""

from __future__ import annotations

import torch


def sample_t(n: int, generator: torch.Generator, stratified: bool = True, t_min: float = 0.0,
             t_max: float = 1.0) -> torch.Tensor:
    """n noise levels in (t_min, t_max], float64 for exact 1/t weights."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if stratified:
        u = ((u[:1] + torch.arange(n, dtype=torch.float64)) / n)[torch.randperm(n, generator=generator)]
        u = u % 1.0
    return t_max - (t_max - t_min) * u  # u in [0, 1) -> t in (t_min, t_max]


def corrupt(x0: torch.Tensor, block_size: int, mask_id: int, generator: torch.Generator,
            stratified: bool = True, t_min: float = 0.0, t_max: float = 1.0):
    """Absorbing corruption per block. x0: [b, L]. Returns (x_t, masked [b, L] bool, t per token)."""
    b, L = x0.shape
    t = sample_t(b * (L // block_size), generator, stratified, t_min, t_max)
    t_tok = t.view(b, L // block_size).repeat_interleave(block_size, dim=1)
    masked = torch.rand(b, L, generator=generator, dtype=torch.float64) < t_tok
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, t_tok
