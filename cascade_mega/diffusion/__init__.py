"""Block-diffusion math: masks, noise, objectives. Public: `training_mask(seq_len, block_size)`."""

from cascade_mega.diffusion.masks import AttentionLayout, training_mask

__all__ = ["AttentionLayout", "training_mask"]
