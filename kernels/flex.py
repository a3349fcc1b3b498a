"""Block-diffusion attention with FlexAttention (GPU): the block mask is built once per shape.

FlexAttention skips fully masked tiles in forward and backward. Compiled on CUDA; on the CPU its
backward raises, so training on CPU uses `tiled.py` (this module's forward still runs there, which
the tests use to check the mask function).
"""

from __future__ import annotations

import functools

import torch


def mask_mod_for(seq_len: int, block_size: int, views: int, documents=None):
    """(q, kv) -> may attend, for the layout [x_t^1; ...; x_t^V; x_0]; with `documents` ([b, L]
    document ids of packed sequences) only within a document."""
    L, B, V = seq_len, block_size, views

    def mask_mod(b, h, q_idx, kv_idx):
        q_stream, k_stream = q_idx // L, kv_idx // L
        q_blk, k_blk = (q_idx % L) // B, (kv_idx % L) // B
        q_clean, k_clean = q_stream == V, k_stream == V
        bd = (q_stream == k_stream) & ~q_clean & (q_blk == k_blk)
        obc = ~q_clean & k_clean & (k_blk < q_blk)
        bc = q_clean & k_clean & (k_blk <= q_blk)
        if documents is None:
            return bd | obc | bc
        return (bd | obc | bc) & (documents[b, q_idx % L] == documents[b, kv_idx % L])

    return mask_mod


@functools.lru_cache(maxsize=16)
def block_mask(seq_len: int, block_size: int, views: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    n = (views + 1) * seq_len
    return create_block_mask(mask_mod_for(seq_len, block_size, views), None, None, n, n,
                             device=device)


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() \
        else flex_attention


def block_diffusion_attention(q, k, v, seq_len: int, block_size: int, views: int = 1,
                              scale: float | None = None, documents=None):
    if documents is None:
        mask = block_mask(seq_len, block_size, views, str(q.device))
    else:  # a new block mask per batch: the documents differ
        from torch.nn.attention.flex_attention import create_block_mask

        n = (views + 1) * seq_len
        mask = create_block_mask(mask_mod_for(seq_len, block_size, views, documents.to(q.device)),
                                 q.shape[0], None, n, n, device=str(q.device))
    gqa = k.shape[1] != q.shape[1]
    return _compiled()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
