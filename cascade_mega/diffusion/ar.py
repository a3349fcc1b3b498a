"""The AR baseline: next-token prediction under a causal mask, as its own objective.

It shares block diffusion's step (`block.py`: `objective.prepare` lays out one causal stream with
the labels as targets, every target weight 1, no noise) and answers its own layout: one stream
of L rows, every row read out, L (L + 1) / 2 attention pairs, causal (block size 1). A
block-size schedule's AR phase (B = 1, `objective.at_step`) trains this layout inside a
block-diffusion run.
"""

from __future__ import annotations

from cascade_mega.diffusion.base import SequenceLayout, register
from cascade_mega.diffusion.block import BlockDiffusion


@register("ar")
class AR(BlockDiffusion):
    accuracy = "acc"  # every target is scored

    @classmethod
    def layout(cls, cfg) -> SequenceLayout:
        L = cfg.data.seq_len
        return SequenceLayout("causal", L, L, L * (L + 1) // 2, 1)

    def draw(self, cfg, split: str, step: int):
        return None  # no noise
