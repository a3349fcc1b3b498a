"""Training objectives on one model: block diffusion (B = 1 .. L) and the AR baseline.

block_diffusion, B < L: one forward over `[x_t ; x_0]` (2L tokens, same position ids for both
  halves) with the 2L mask; the loss is read off the x_t half only:
      NELBO = sum_blocks E_t[(1/t) sum_{masked i} -log p(x0_i | x_t block, clean prefix)] / #tokens
block_diffusion, B = L: full masked diffusion, one L-length forward with full attention.
shifted_prediction: x0_i is predicted from row i-1 (AR-style); the first token of a block from the
  clean stream's last row of the previous block; token 0 has no predecessor and is not a target.
ar: next-token prediction with a causal mask (labels = the sequence shifted by one).

`prepare()` turns a batch of clean tokens into model inputs plus per-token loss weights;
`reduce()` turns the model's per-token cross-entropy into the summed loss and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.diffusion.noise import Noise, corrupt, draw
from cascade_mega.model.gpt import ReadOut


@dataclass
class Prepared:
    input_ids: torch.Tensor  # [b, S]
    position_ids: torch.Tensor  # [b, S]
    layout: AttentionLayout
    readout: ReadOut
    weight: torch.Tensor  # [b, n] fp64 loss weight per read-out target (1/t on masked, else 0)
    scored: torch.Tensor  # [b, n] bool: targets that count for accuracy (masked / all for AR)
    num_tokens: int  # denominator of the per-token NELBO


def shifted_rows(L: int, B: int, clean_stream: bool) -> torch.Tensor:
    """Row that predicts target i (i = 1 .. L-1) under shifted prediction."""
    i = torch.arange(1, L)
    rows = i - 1
    if clean_stream:
        starts = i % B == 0
        rows = torch.where(starts, L + i - 1, rows)  # clean stream's last row of previous block
    return rows


def draw_noise(cfg, n: int, generator: torch.Generator, t_range=None) -> Noise:
    """Noise for n sequences under the run's diffusion settings (t_range overrides the clip)."""
    d = cfg.diffusion
    t_min, t_max = t_range if t_range is not None else (d.t_min, d.t_max)
    return draw(n, cfg.data.seq_len, d.block_size, generator, d.noise_sampling == "stratified",
                t_min, t_max)


def prepare(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, cfg, mask_id: int,
            noise, *, t_range=None) -> Prepared:
    """tokens/labels/loss_mask: [b, L] as megatron's GPT dataset yields them.

    noise: a `Noise` for these b sequences, or a torch.Generator to draw one from.
    """
    d = cfg.diffusion
    b, L = tokens.shape
    pos = torch.arange(L).expand(b, L)
    if d.objective == "ar":
        w = loss_mask.to(torch.float64)
        return Prepared(tokens, pos, AttentionLayout("causal", L), ReadOut(None, labels), w,
                        loss_mask.bool(), int(loss_mask.sum()))
    B = d.block_size
    if isinstance(noise, torch.Generator):
        noise = draw(b, L, B, noise, d.noise_sampling == "stratified",
                     *(t_range if t_range is not None else (d.t_min, d.t_max)))
    x_t, masked = corrupt(tokens, noise, mask_id)
    weight = masked.to(torch.float64) / noise.t
    clean_stream = B < L
    if clean_stream:
        input_ids = torch.cat([x_t, tokens], dim=1)
        position_ids = torch.cat([pos, pos], dim=1)
        layout = AttentionLayout("block_diffusion", L, B)
    else:
        input_ids, position_ids, layout = x_t, pos, AttentionLayout("full", L, L)
    valid = loss_mask.bool()
    if d.shifted_prediction:
        rows = shifted_rows(L, B, clean_stream)
        targets, weight, masked, valid = tokens[:, 1:], weight[:, 1:], masked[:, 1:], valid[:, 1:]
    else:
        rows, targets = torch.arange(L), tokens
    weight = weight * valid
    return Prepared(input_ids, position_ids, layout, ReadOut(rows, targets), weight,
                    masked & valid, int(valid.sum()))


def reduce(ce: torch.Tensor, correct: torch.Tensor, prep: Prepared):
    """Summed weighted loss (for backward) and metric sums. ce, correct: [b, n]."""
    w = prep.weight.to(ce.dtype)
    loss_sum = (ce * w).sum()
    scored = prep.scored
    stats = torch.stack([
        loss_sum.detach().double(),
        torch.tensor(float(prep.num_tokens), dtype=torch.float64),
        (correct & scored).sum().double(),
        scored.sum().double(),
    ])
    return loss_sum, stats
