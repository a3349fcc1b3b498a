"""Block-diffusion-aware core attention for megatron-core's layer spec.

It fills the `core_attention` slot of the local layer spec (same constructor and forward
signature as megatron's DotProductAttention), so the rest of the layer (QKV projections, RoPE,
output projection, tensor parallel) is megatron-core's own. The sequence layout arrives as an
`AttentionLayout` in the `attention_mask` argument.

Kernels for the block-diffusion layout (`model.attention_kernel`):
- `tiled` (`kernels/tiled.py`): dense SDPA tiles that follow the mask, forward and backward on any
  device; the default on CPU.
- `flex` (`kernels/flex.py`): FlexAttention with a cached block mask; the default on GPU.
- `dense`: SDPA under the full boolean (V+1)L mask; the baseline the benchmarks compare against.
AR uses SDPA's causal path; full diffusion (B = L) uses unmasked SDPA per view.

Context parallel (the layout is split, `AttentionLayout.chunks`): each rank holds two zigzag chunks
of every stream. The only keys a rank needs from the others are those of the clean stream (noisy
rows see their own block, which a chunk never splits, and the clean prefix), so the clean stream's
K/V are all-gathered across the context-parallel group (backward: reduce-scatter of their
gradients, megatron's sequence-parallel mappings) and the tiled kernel attends the local queries
to the gathered prefix. AR under context parallel is the same kernel with one stream and B = 1.
Full diffusion (B = L) gathers every view's K/V (a row sees its whole view) and attends the local
queries of each view to it with SDPA (`gather_kv`, `_attend_whole_views`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from cascade_mega.diffusion.masks import AttentionLayout, context_chunks
from cascade_mega.runtime.device import current as current_device

KERNELS = ("auto", "tiled", "flex", "dense")


def resolve_kernel(kernel: str, device: Optional[torch.device] = None,
                   grad: bool = False) -> str:
    """`auto`: FlexAttention on CUDA, the tiled kernel elsewhere (the device of the queries, or
    the process's device). FlexAttention has no backward off CUDA: a forward that needs
    gradients there (training on the CPU) runs the tiled kernel, with one warning saying so;
    evaluation and decoding run FlexAttention (compiled, `kernels/flex.py`)."""
    dev = device if device is not None else current_device()
    if kernel == "auto":
        return "flex" if dev.type == "cuda" else "tiled"
    if kernel == "flex" and grad and dev.type != "cuda":
        _warn_once(f"model.attention_kernel=flex: FlexAttention has no backward on {dev.type}; "
                   "training forwards there run the tiled kernel (evaluation and decoding run "
                   "FlexAttention)")
        return "tiled"
    return kernel


class KernelWarning(RuntimeWarning):
    """A layer runs another kernel than the one configured (not among the library warnings the
    command line silences)."""


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, KernelWarning, stacklevel=3)


def _needs_grad(query) -> bool:
    return torch.is_grad_enabled() and query.requires_grad


@functools.lru_cache(maxsize=16)
def _cached_mask(layout: AttentionLayout, device: torch.device) -> torch.Tensor:
    return layout.dense(device)


def gathered_streams(layout: AttentionLayout) -> range:
    """The streams whose keys a context-parallel rank needs whole: the clean stream (block
    diffusion, AR: a row sees its own block, which a chunk never splits, and the clean prefix)
    or every view (full diffusion: a row sees its whole view)."""
    last = layout.streams - int(layout.causal_stream)
    return range(0 if layout.kind == "full" else last - 1, last)


def gather_kv(key, value, layout: AttentionLayout, group):
    """K/V of the `gathered_streams`, whole, from every context-parallel rank's chunks.

    key, value: this rank's rows, megatron layout [s, b, g, d]. Returns (k, v) as [b, g, n L, d],
    stream by stream in sequence order. One all-gather carries K and V together (backward: a
    reduce-scatter of their gradients).
    """
    streams, local = gathered_streams(layout), layout.local_len
    d, held = key.shape[-1], len(layout.chunks)
    rows = slice(streams.start * local, streams.stop * local)
    kv = torch.cat([key[rows], value[rows]], dim=-1)
    gathered = gather_from_sequence_parallel_region(kv, True, group).split(layout.chunk_len)
    size = len(gathered) // (held * len(streams))
    # rank r's rows: stream by stream, its chunks in order
    where = {(s, c): (r * len(streams) + s) * held + j for r in range(size)
             for s in range(len(streams)) for j, c in enumerate(context_chunks(r, size))}
    kv = torch.cat([gathered[where[s, c]] for s in range(len(streams))
                    for c in range(layout.num_chunks)])
    return tuple(x.permute(1, 2, 0, 3) for x in kv.split(d, dim=-1))


def attend(query, key, value, layout: AttentionLayout, kernel: str = "auto",
           scale: Optional[float] = None, clean_kv=None):
    """q: [b, h, s, d]; k, v: [b, g, s, d] with g dividing h (grouped-query). Returns [b, h, s, d].

    clean_kv: the gathered K/V (`gather_kv`: the clean stream, or every view of full diffusion)
    when the layout is split across context-parallel ranks.
    """
    gqa = key.shape[1] != query.shape[1]
    if layout.causal_stream:  # the auxiliary AR stream attends only to itself: its own call
        n = layout.total_len - layout.local_len
        inner, ar = layout.cached("streams", lambda: (
            layout.without_causal_stream,
            AttentionLayout("causal", layout.seq_len, documents=layout.documents)))
        return torch.cat([
            attend(query[:, :, :n], key[:, :, :n], value[:, :, :n], inner, kernel, scale,
                   clean_kv),
            attend(query[:, :, n:], key[:, :, n:], value[:, :, n:], ar, kernel, scale)], dim=2)
    if layout.split and layout.kind == "full":  # context parallel: each view's keys whole
        return _attend_whole_views(query, *clean_kv, layout, scale, gqa)
    if layout.split:  # context parallel: the tiled kernel, documents included
        from cascade_kernels import tiled

        causal = layout.kind == "causal"
        return tiled.block_diffusion_attention(  # documents: on the device with the batch
            query, key, value, layout.seq_len, 1 if causal else layout.block_size,
            0 if causal else layout.views, scale=scale, chunks=layout.chunks,
            num_chunks=layout.num_chunks, clean_kv=clean_kv, documents=layout.documents,
            clean_stream=layout.clean_stream)
    if layout.documents is not None:
        return _attend_within_documents(query, key, value, layout, kernel, scale, gqa)
    if layout.kind == "causal":
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                              enable_gqa=gqa)
    if layout.kind == "full":
        L = layout.seq_len
        return torch.cat([
            F.scaled_dot_product_attention(query[:, :, i * L:(i + 1) * L],
                                           key[:, :, i * L:(i + 1) * L],
                                           value[:, :, i * L:(i + 1) * L], scale=scale,
                                           enable_gqa=gqa)
            for i in range(layout.views)], dim=2)
    kernel = resolve_kernel(kernel, query.device, _needs_grad(query))
    if kernel == "tiled":
        from cascade_kernels import tiled

        return tiled.block_diffusion_attention(query, key, value, layout.seq_len,
                                               layout.block_size, layout.views, scale=scale,
                                               clean_stream=layout.clean_stream)
    if kernel == "flex":
        from cascade_kernels import flex

        return flex.attention(query, key, value, layout, scale)
    mask = _cached_mask(layout, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          enable_gqa=gqa)


def _attend_whole_views(query, key, value, layout, scale, gqa):
    """Full diffusion under context parallel: this rank's rows of each view (its zigzag chunks)
    attend to that view's whole K/V, gathered (`gather_kv`): exact, so no log-sum-exp merge;
    packed documents mask keys outside the query's document. SDPA (its memory-efficient or
    flash kernel on a GPU; a boolean mask only with documents)."""
    L, n = layout.seq_len, layout.local_len
    mask = None
    if layout.documents is not None:
        docs = layout.documents
        positions = layout.rows()[:n].to(docs.device) % L
        mask = (docs[:, positions, None] == docs[:, None, :])[:, None]  # [b, 1, n, L]
    return torch.cat([
        F.scaled_dot_product_attention(query[:, :, v * n:(v + 1) * n],
                                       key[:, :, v * L:(v + 1) * L],
                                       value[:, :, v * L:(v + 1) * L], attn_mask=mask,
                                       scale=scale, enable_gqa=gqa)
        for v in range(layout.views)], dim=2)


def _attend_within_documents(query, key, value, layout, kernel, scale, gqa):
    """Packed documents (`data.document_mask`): the layout's mask AND same-document, per sequence,
    for every kind of layout (AR too). FlexAttention takes it as a mask function (GPU); elsewhere
    SDPA under the dense mask. Either is built once per micro-batch (the layout object is the
    same in every layer) and reused by the other layers."""
    if resolve_kernel(kernel, query.device, _needs_grad(query)) == "flex":
        from cascade_kernels import flex

        return flex.attention(query, key, value, layout, scale)
    mask = layout.cached(("dense", query.device), lambda: layout.dense(query.device))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          enable_gqa=gqa)


class BlockDiffusionAttention(MegatronModule):
    """Drop-in `core_attention` that follows the project's `AttentionLayout`."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, kernel: str = "auto"):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout):
            raise ValueError("attention dropout is not supported by BlockDiffusionAttention")
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale
        self.kernel = kernel
        self.layer_number = layer_number
        self.cp_group = pg_collection.cp if pg_collection is not None and \
            hasattr(pg_collection, "cp") else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        # megatron layout [s, b, heads, d] -> SDPA layout [b, heads, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        s, b = query.shape[0], query.shape[1]
        if hasattr(attention_mask, "attend"):  # a mask that attends itself (kv_cache.DecodeStep)
            # decoding runs FlexAttention when it is asked for by name (`auto` decodes with SDPA
            # under the dense decoding mask, on a GPU too)
            out = attention_mask.attend(self.layer_number, q, k, v, self.softmax_scale,
                                        "flex" if self.kernel == "flex" else "sdpa")
            return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)
        if not isinstance(attention_mask, AttentionLayout):
            raise TypeError("BlockDiffusionAttention expects an AttentionLayout as attention_mask")
        clean_kv = None
        if attention_mask.split:
            group = self.cp_group or parallel_state.get_context_parallel_group()
            clean_kv = gather_kv(key, value, attention_mask, group)
        out = attend(q, k, v, attention_mask, self.kernel, self.softmax_scale, clean_kv)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)
