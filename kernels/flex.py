"""FlexAttention for every layout (GPU): the mask function is the layout's own
(`AttentionLayout.mask_fn`), restricted to each document when the batch packs documents.

FlexAttention skips fully masked tiles in forward and backward. The block mask is built once per
(layout, device); with documents it changes with every micro-batch, so it is built once per
micro-batch and kept on the layout object, which every layer of the forward receives (not once
per layer). Compiled on CUDA; on the CPU its backward raises, so training on CPU uses `tiled.py`
(this module's forward still runs there, which the tests use to check the mask function).
"""

from __future__ import annotations

import functools

import torch


def mask_mod(layout, documents=None):
    """(b, h, q, kv) -> may attend, over the rows of the whole layout; with `documents` ([b, L]
    document ids of packed sequences) only within a document."""
    allowed, L = layout.mask_fn(), layout.seq_len
    if documents is None:
        return lambda b, h, q, kv: allowed(q, kv)
    return lambda b, h, q, kv: allowed(q, kv) & (documents[b, q % L] == documents[b, kv % L])


@functools.lru_cache(maxsize=16)
def _static_block_mask(layout, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    n = layout.total_len
    return create_block_mask(mask_mod(layout), None, None, n, n, device=device)


def block_mask(layout, device: torch.device):
    if layout.documents is None:
        return _static_block_mask(layout, str(device))

    def build():
        from torch.nn.attention.flex_attention import create_block_mask

        documents, n = layout.documents.to(device), layout.total_len
        return create_block_mask(mask_mod(layout, documents), documents.shape[0], None, n, n,
                                 device=str(device))

    return layout.cached(("flex", str(device)), build)


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() \
        else flex_attention


def attention(q, k, v, layout, scale: float | None = None):
    """q: [b, h, S, d]; k, v: [b, g, S, d] over the rows of `layout` (not split across ranks)."""
    gqa = k.shape[1] != q.shape[1]
    return _compiled()(q, k, v, block_mask=block_mask(layout, q.device), scale=scale,
                       enable_gqa=gqa)
