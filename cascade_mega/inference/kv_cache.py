"""The KV cache of block decoding, in the core-attention slot of megatron-core's layers.

A decoding forward passes a `DecodeStep` where training passes an `AttentionLayout`; the layers
(QKV projections, RoPE from the position ids, MLP) are megatron-core's, unchanged. Each row of a
decoding forward is one of:

  CLEAN  a committed token (prompt, or a block just decided): it attends the cache and the clean
         rows of this forward in the same or earlier blocks (block-causal, the training mask's x_0
         rows; with a causal clean stream those at or before its position), and its K/V join the
         cache after the forward (`commit`);
  NOISY  a row of the block being denoised: it attends the cache, this forward's clean rows of
         earlier blocks and the noisy rows of its own block (the training mask's x_t rows);
  IDLE   padding for a sequence with nothing to do in this forward: it sees only itself.

The keys are the cache (positions 0 .. len_i - 1 of sequence i, all committed; the cache index is
the position) followed by the forward's own rows. A clean row sees the whole cache (every cached
position is before its own); a noisy row the cached positions before its block (the training
mask's x_t rows: speculative decoding commits tokens inside the block it drafts next). With block size 1 the clean rows are causal: AR decoding is the
same machinery. Noisy rows never enter the cache: a block's clean K/V are computed once, by the
forward that commits it (fused with the first denoising step of the next block).

Part of the decoding core (`inference/network.py`): no import of the project beyond the core and
the mask source, so `cascade convert mcore-to-hf` copies it into an exported model. The flex
kernel comes from the network (`Network.flex`), never imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cascade_mega.diffusion.masks import AttentionLayout

IDLE, CLEAN, NOISY = 0, 1, 2


def to_device(x, device):
    """A host tensor (or a tuple of them, None kept) on `device`: pinned and non-blocking on CUDA.
    The decoders lay their rows out on the host and cross once per forward with this."""
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device) for t in x)
    if x is None or x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=device.type != "cpu")


class KVCache:
    def __init__(self, batch: int, max_len: int):
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long)  # host: per-sequence bookkeeping
        self.k: dict = {}
        self.v: dict = {}

    def layer(self, number: int, like: torch.Tensor, tail: int = 0):
        """Layer `number`'s cache [b, g, max_len + room, d]; `tail`: rows it must hold past
        max_len (FlexAttention decoding writes a forward's rows there, `DecodeStep`)."""
        have = self.k[number].shape[2] - self.max_len if number in self.k else -1
        if have < tail:
            shape = (len(self.lengths), like.shape[1], self.max_len + tail, like.shape[3])
            k, v = like.new_zeros(shape), like.new_zeros(shape)
            if number in self.k:  # a longer prefill than before: keep what is cached
                k[:, :, :self.max_len] = self.k[number][:, :, :self.max_len]
                v[:, :, :self.max_len] = self.v[number][:, :, :self.max_len]
            self.k[number], self.v[number] = k, v
        return self.k[number], self.v[number]


class DecodeStep:
    """One decoding forward: rows [b, n] of kinds and positions (host), the block size and how
    the clean stream attends (`AttentionLayout.clean_stream`); what the attention needs."""

    kind = "decode"

    def __init__(self, cache: KVCache, kinds: torch.Tensor, positions: torch.Tensor,
                 block_size: int = 1, flex=None, clean_stream: str = "block_causal"):
        self.cache, self.kinds, self.positions, self.flex = cache, kinds, positions, flex
        self.block_size, self.clean_stream = block_size, clean_stream
        self.used = int(cache.lengths.max())
        self.mask = None  # on the device of the first layer's queries, made once per forward
        self.flex_mask = None  # the same for FlexAttention
        self.pending = {}

    def _mask(self) -> torch.Tensor:
        """[b, 1, n, used + n] bool, True = may attend.

        Among this forward's rows, the training mask itself (`AttentionLayout.mask_fn` of the 2L
        layout): a clean row at position p is row p of the clean stream, a noisy row row p of
        the noisy stream. Built on the host from the host-side row kinds, then copied once per
        forward (`attend`)."""
        kinds, positions = self.kinds, self.positions.clamp(min=0)
        b, n = kinds.shape
        B = self.block_size
        span = (int(positions.max()) // B + 1) * B if positions.numel() else B
        index = torch.where(kinds == CLEAN, span + positions, positions)
        active = kinds != IDLE
        rows = AttentionLayout("block_diffusion", span, B, clean_stream=self.clean_stream) \
            .mask_fn()(index[:, :, None], index[:, None, :])
        rows &= active[:, :, None] & active[:, None, :]
        rows |= ~active[:, :, None] & torch.eye(n, dtype=torch.bool)[None]
        cached = torch.arange(self.used)[None, None, :] < self.cache_limit()[:, :, None]
        return torch.cat([cached, rows], dim=2)[:, None]

    def cache_limit(self) -> torch.Tensor:
        """[b, n] cached positions each row sees (host): the sequence's length for a clean row,
        no further than its block's start for a noisy row, none for an idle one."""
        lengths = self.cache.lengths[:, None].expand_as(self.kinds)
        start = self.positions.clamp(min=0) // self.block_size * self.block_size
        limit = torch.where(self.kinds == NOISY, torch.minimum(lengths, start), lengths)
        return torch.where(self.kinds == IDLE, 0, limit)

    def attend(self, layer: int, q, k, v, scale=None, kernel: str = "sdpa"):
        """q: [b, h, n, d]; k, v: [b, g, n, d] of this forward's rows. kernel: `flex`
        (`model.attention_kernel=flex`) attends through FlexAttention at fixed shapes
        (`_attend_flex`), `sdpa` through SDPA under the dense mask."""
        if kernel == "flex":
            if self.flex is None:
                raise RuntimeError("a layer attends through FlexAttention, but the network gave "
                                   "the decoder no flex kernel (Network.flex)")
            self.pending[layer] = (k, v)
            return self._attend_flex(layer, q, k, v, scale)
        cache_k, cache_v = self.cache.layer(layer, k)
        keys = torch.cat([cache_k[:, :, :self.used], k], dim=2)
        values = torch.cat([cache_v[:, :, :self.used], v], dim=2)
        self.pending[layer] = (k, v)
        if self.mask is None:  # once per forward, not once per layer
            self.mask = to_device(self._mask(), q.device)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])

    def _attend_flex(self, layer: int, q, k, v, scale):
        """FlexAttention over the whole preallocated cache and this forward's rows padded to
        `flex.decode_rows(n)`: the shapes are the same at every step of a generation (one
        compiled signature per row bucket, `kernels/flex.py`), and the block mask skips the
        cache's unused tiles and the padding. The rows' K/V are written into the cache's room
        past max_len (the keys are a view of it, nothing of the cache is copied); padded rows
        attend nothing and are dropped."""
        flex, n = self.flex, q.shape[2]
        m = flex.decode_rows(n)
        if self.flex_mask is None:  # once per forward, not once per layer
            self.flex_mask = self._flex_mask(n, m, q.device)
        cache_k, cache_v = self.cache.layer(layer, k, tail=m)
        end = self.cache.max_len + m
        cache_k[:, :, self.cache.max_len:self.cache.max_len + n] = k
        cache_v[:, :, self.cache.max_len:self.cache.max_len + n] = v
        out = flex.run(F.pad(q, (0, 0, 0, m - n)), cache_k[:, :, :end], cache_v[:, :, :end],
                       self.flex_mask, scale)
        return out[:, :, :n]

    def _flex_mask(self, n: int, m: int, device):
        """The block mask of `_mask()` over [cache (max_len) ; rows padded to m]: a cached key
        counts below its sequence's length, for an active row; this forward's keys follow the
        rows' own mask. Built on the host from the host-side bookkeeping, copied once."""
        b, cached = len(self.cache.lengths), self.cache.max_len
        rows = torch.zeros(b, m, m, dtype=torch.bool)  # host-side on purpose: copied below
        rows[:, :n, :n] = self._mask()[:, 0, :, self.used:]
        limit = torch.zeros(b, m, dtype=torch.long)  # host-side too
        limit[:, :n] = self.cache_limit()
        limit, rows = (to_device(x, device) for x in (limit, rows))

        def allowed(s, h, qi, kv):
            own = rows[s, qi, (kv - cached).clamp(min=0)]
            return torch.where(kv < cached, kv < limit[s, qi], own)

        return self.flex.create(allowed, b, m, cached + m, device)

    def commit(self) -> None:
        """Append every sequence's clean rows (in row order, which is position order) to its
        cache. (Speculative decoding then cuts a sequence's cache back to the tokens it accepts:
        `cache.lengths`.)"""
        clean = self.kinds == CLEAN
        counts = clean.sum(dim=1)
        for layer, (k, v) in self.pending.items():
            cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
            for i in range(len(counts)):
                if counts[i]:
                    start = int(self.cache.lengths[i])
                    rows = clean[i].nonzero().squeeze(1).to(k.device)
                    cache_k[i, :, start:start + len(rows)] = k[i, :, rows]
                    cache_v[i, :, start:start + len(rows)] = v[i, :, rows]
        self.cache.lengths += counts
        self.pending = {}
