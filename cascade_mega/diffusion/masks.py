"""Attention masks as small composable functions of (query index, key index).

Convention inside the project: True = may attend. (megatron-core's boolean masks mean the
opposite; convert only at that boundary.)

The block-diffusion training layout is one sequence `[x_t ; x_0]` of length 2L, blocks of size B:

    M = [[ M_BD , M_OBC ],   M_BD : x_t query, x_t key, same block (bidirectional in the block)
         [  0   , M_BC  ]]   M_OBC: x_t query, x_0 key, key's block strictly before the query's
                             M_BC : x_0 query, x_0 key, key's block same or earlier (block-causal)

`AttentionLayout` is the one source of who may attend to whom, for every layout (AR, full
diffusion, the 2L layout and its V views, the auxiliary causal stream, packed documents,
context-parallel chunks): FlexAttention's `mask_mod`, the tiled kernel's diagonal piece, the KV
cache's decoding mask and `training_mask(L, B)` (the dense 2L mask) are all derived from
`AttentionLayout.mask_fn`. `tests/test_masks.py` checks each derived form against references
written from the definitions, not from this module. Two per-row inputs derived from the tokens
live here too, for the same reason (one source, importable by the standalone decoding core):
`document_ids` (packed documents) and `masked_share` (a time-conditioned model's noise level).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


def causal(q, k):
    return k <= q


def same_block(block_size):
    return lambda q, k: q // block_size == k // block_size


def block_causal(block_size):
    return lambda q, k: k // block_size <= q // block_size


def strictly_block_causal(block_size):
    return lambda q, k: k // block_size < q // block_size


def dense_mask(fn, q_len: int, k_len: int, device=None) -> torch.Tensor:
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    return fn(q, k)


def training_mask(seq_len: int, block_size: int) -> torch.Tensor:
    """The dense 2L x 2L boolean block-diffusion training mask (True = may attend)."""
    if seq_len <= 0 or block_size <= 0 or seq_len % block_size:
        raise ValueError(f"block_size {block_size} must divide seq_len {seq_len}")
    return AttentionLayout("block_diffusion", seq_len, block_size).dense()


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document index of each token of packed sequences [b, L]: the number of end-of-document
    tokens before it (an end-of-document token belongs to the document it ends)."""
    ends = (tokens == eod).long()
    return ends.cumsum(-1) - ends


def masked_share(ids: torch.Tensor, mask_id: int, block: int) -> torch.Tensor:
    """[b, n] token ids (n a multiple of `block`) -> [b, n] float32: each row's share of [MASK]
    among its block's `block` positions (on the device of `ids`)."""
    b, n = ids.shape
    share = (ids == mask_id).float().view(b, n // block, block).mean(2, keepdim=True)
    return share.expand(b, n // block, block).reshape(b, n)


def context_chunks(rank: int, size: int) -> tuple[int, ...]:
    """Chunks of every stream held by rank `rank` of a context-parallel group of `size`.

    Each stream is cut into 2 x size chunks; rank r holds chunks r and 2 size - 1 - r (zigzag).
    Under block-causal masks a chunk's work grows with its position, so each rank gets one early
    and one late chunk and the same amount of attention work.
    """
    return (rank, 2 * size - 1 - rank) if size > 1 else (0,)


@dataclass(frozen=True)
class AttentionLayout:
    """What the core attention needs to know about the sequence it is given.

    kind: 'causal' (AR), 'full' (B = L masked diffusion, `views` independent sequences side by
    side), or 'block_diffusion' (`[x_t^1 ; ... ; x_t^V ; x_0]`, (V+1) L rows; V = 1 is the 2L
    layout). It travels through megatron-core in the `attention_mask` argument, which the layers
    pass to the core attention untouched.

    Under context parallel a rank holds `chunks` (of `num_chunks`) of every stream: its rows are,
    stream by stream, those chunks in order (`rows()` maps them to the rows of the whole layout).

    documents: [b, L] document ids of packed sequences (`data.document_mask`): a row then also
    attends only to rows of its own document. Not part of equality or hashing (it changes with
    every batch); `dense()` is the one place that applies it.

    causal_stream: one more stream after the others, the clean sequence under a causal mask that
    attends only to itself (the auxiliary AR loss, `diffusion.ar_loss_weight`).

    clean_stream: how the clean stream x_0 attends to itself: 'block_causal' (its own block and
    the earlier ones, BD3-LM's) or 'causal' (token by token, an AR model: its next-token loss is
    the AR loss and its K/V are an AR model's cache; `diffusion.clean_stream`). The noisy blocks
    see the clean blocks before their own either way.

    routing_scale: the micro-batch's loss tokens per row (`objective.prepare`), by which an MoE
    layer's router scales its balancing losses (`model/moe.py`); None (decoding, a teacher):
    megatron-core's scaling. Not the attention's: it rides here because the layout is the one
    per-forward argument megatron-core hands every layer (`model/layers.py`). Not part of
    equality or hashing.
    """

    kind: str
    seq_len: int
    block_size: int = 1
    views: int = 1
    chunks: tuple = (0,)
    num_chunks: int = 1
    documents: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    causal_stream: bool = False
    clean_stream: str = "block_causal"
    routing_scale: Optional[float] = field(default=None, compare=False)
    # what the kernels derive from this layout for one forward (a per-batch block mask, a dense
    # mask): built by the first layer, reused by the others; not copied by `replace`
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.clean_stream not in ("block_causal", "causal"):
            raise ValueError(f"clean_stream must be 'block_causal' or 'causal', got "
                             f"{self.clean_stream!r}")

    def cached(self, key, build):
        """`build()`, once per layout object (every layer of a forward gets the same one)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def mask_fn(self):
        """The mask over the rows of the whole (unsplit) layout."""
        if self.causal_stream:
            start, inner = (self.streams - 1) * self.seq_len, self.without_causal_stream.mask_fn()
            return lambda q, k: torch.where(q >= start, (k >= start) & (k <= q),
                                            (k < start) & inner(q, k))
        L, B, V = self.seq_len, self.block_size, self.views
        if self.kind == "causal":
            return causal
        if self.kind == "full":
            return lambda q, k: q // L == k // L

        clean_rule = causal if self.clean_stream == "causal" else block_causal(B)

        def fn(q, k):  # view v rows see their own view's block and the shared clean stream
            # (V = 0: the clean stream alone, block-causal; with B = 1 that is causal)
            q_stream, k_stream = q // L, k // L
            qi, ki = q % L, k % L
            q_clean, k_clean = q_stream == V, k_stream == V
            return ((q_stream == k_stream) & ~q_clean & same_block(B)(qi, ki)) | \
                (~q_clean & k_clean & strictly_block_causal(B)(qi, ki)) | \
                (q_clean & k_clean & clean_rule(qi, ki))

        return fn

    def dense(self, device=None) -> torch.Tensor:
        """The mask over this rank's rows: [S, S], or [b, 1, S, S] with documents."""
        rows = self.rows().to(device)
        mask = self.mask_fn()(rows[:, None], rows[None, :])
        if self.documents is None:
            return mask
        doc = self.documents.to(device)[:, rows % self.seq_len]  # [b, S]
        return (mask & (doc[:, :, None] == doc[:, None, :]))[:, None]

    @property
    def without_causal_stream(self) -> "AttentionLayout":
        return replace(self, causal_stream=False)

    @property
    def streams(self) -> int:
        extra = int(self.causal_stream)
        if self.kind == "block_diffusion":
            return self.views + 1 + extra
        return (self.views if self.kind == "full" else 1) + extra

    @property
    def split(self) -> bool:
        return self.num_chunks > 1

    @property
    def chunk_len(self) -> int:
        return self.seq_len // self.num_chunks

    @property
    def local_len(self) -> int:
        """Rows of one stream held here."""
        return self.chunk_len * len(self.chunks)

    @property
    def total_len(self) -> int:
        return self.streams * self.local_len

    def rows(self) -> torch.Tensor:
        """Row of the whole layout for each row held here."""
        C = self.chunk_len
        return torch.cat([torch.arange(s * self.seq_len + c * C, s * self.seq_len + (c + 1) * C)
                          for s in range(self.streams) for c in self.chunks])

    def split_for_context(self, rank: int, size: int) -> "AttentionLayout":
        return replace(self, chunks=context_chunks(rank, size),
                       num_chunks=2 * size if size > 1 else 1)
