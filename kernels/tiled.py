"""Block-diffusion attention as dense tiles: compute and memory follow the mask's non-zeros.

Layout: `[x_t^1 ; ... ; x_t^V ; x_0]`, each stream of length L, blocks of size B (V = 1 is the
usual 2L layout; V > 1 shares one clean stream between several noisy views). Rows are cut into
tiles of T positions (T a multiple of B dividing L). The queries of tile i of every stream
((V+1)T rows) need exactly two pieces:

  (a) the clean prefix x_0[0 : iT]: every block there is strictly earlier than the tile's blocks,
      so all of it is visible to every query row: one unmasked attention, keys read in place;
  (b) the diagonal: x_0[tile i] ++ x_t^1[tile i] ++ ... ++ x_t^V[tile i], under one small
      (V+1)T x (V+1)T mask (clean rows block-causal on x_0, or causal with a causal clean
      stream; view rows: strictly earlier clean blocks and their own view's block). The mask
      is the same for every tile, built once.

The two pieces are merged exactly through their log-sum-exp; the backward pass calls the fused
attention backward of each piece with the merged output and log-sum-exp (the ring-attention
identity), so nothing of the softmax is materialised. Cost: about L^2 + 3LT score entries for
V = 1, against 4L^2 for the dense mask and L^2/2 for AR causal attention. No (2L)^2 tensor exists.

Context parallel: the rows held are some tiles of every stream (whole chunks), and piece (a) reads
the prefix from the whole clean stream gathered across ranks; its gradient is returned for the
gather's reduce-scatter. With V = 0 and B = 1 the same code is causal attention over one stream.
Packed documents (`documents`): both pieces also keep each query inside its document (per-tile,
per-sequence masks); a row whose document starts in its tile takes nothing from piece (a).
"""

from __future__ import annotations

import functools

import torch


# ------------------------------------------------------------------ the fused tile ops, per device
# Each piece is one fused attention that takes an additive mask and returns its log-sum-exp, and
# whose backward accepts the merged output and log-sum-exp. The CPU has the flash kernel for it;
# on CUDA the flash kernel takes no mask (and only fp16/bf16), so the memory-efficient kernel is
# used, which takes a mask, fp32 and bf16. It wants as many K/V heads as query heads (grouped
# K/V are repeated, their gradients summed back) and a mask whose rows are 16-element aligned
# (`diagonal_bias`); it pads the log-sum-exp to a multiple of 32 rows.

def _cpu_fwd(q, k, v, bias, scale):
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    return o, lse, None


def _cpu_bwd(grad, q, k, v, out, lse, bias, scale, extra):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)


def _heads(x, h):
    return x if x.shape[1] == h else x.repeat_interleave(h // x.shape[1], dim=1)


def _fold(dx, g):
    b, h, s, d = dx.shape
    return dx if h == g else dx.view(b, g, h // g, s, d).sum(2)


def _bias_for(q, k, bias):
    return None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _efficient_fwd(q, k, v, bias, scale):
    h = q.shape[1]
    o, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, _heads(k, h), _heads(v, h), _bias_for(q, k, bias), True, 0.0, False, scale=scale)
    return o, lse[:, :, :q.shape[2]], (seed, offset)


def _efficient_bwd(grad, q, k, v, out, lse, bias, scale, extra):
    h, g, s = q.shape[1], k.shape[1], q.shape[2]
    lse = torch.nn.functional.pad(lse, (0, -s % 32)).contiguous()
    # the kernel reads `out` with the row stride of the layout its forward returns ([b, s, h, d]
    # in memory), whatever the tensor's own strides: give it that layout
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, _heads(k, h), _heads(v, h), _bias_for(q, k, bias), out, lse, *extra, 0.0,
        [True, True, True, False], False, scale=scale)
    return dq, _fold(dk, g), _fold(dv, g)


def tile_ops(device: torch.device):
    """(forward, backward) of one fused piece on this device."""
    return (_cpu_fwd, _cpu_bwd) if device.type == "cpu" else (_efficient_fwd, _efficient_bwd)


def tile_size(seq_len: int, block_size: int, target: int = 128) -> int:
    """Largest multiple of block_size that divides seq_len and is <= max(target, block_size)."""
    best, t = block_size, block_size
    while t <= max(target, block_size):
        if seq_len % t == 0:
            best = t
        t += block_size
    return best


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive bias the fused kernels take (0 or
    -inf, query dtype); off the CPU its rows are 16-element aligned (a view into padded memory)."""
    n, device = allowed.shape[-1], allowed.device
    padded = n if device.type == "cpu" else -(-n // 16) * 16
    bias = torch.zeros(*allowed.shape[:-1], padded, dtype=dtype, device=device)[..., :n]
    return bias.masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=64)
def diagonal_bias(block_size: int, views: int, tile: int, device: torch.device,
                  dtype: torch.dtype, clean: str = "block_causal") -> torch.Tensor:
    """Piece (b)'s mask as an additive bias, the same for every tile (no documents)."""
    return _additive(diagonal_mask(block_size, views, tile, device, clean), dtype)


def tile_masks(B: int, V: int, T: int, g: int, documents, dtype, device,
               clean: str = "block_causal"):
    """(piece (b)'s bias, piece (a)'s bias, rows of piece (a) with no key) of global tile g.

    Without documents: the shared diagonal bias and no prefix mask. With documents ([b, L]
    document ids of packed sequences) each piece is also restricted to the query's document,
    per sequence ([b, 1, R, keys]); a row whose document starts inside the tile has no key in
    the prefix (piece (a) then contributes nothing: the fused kernels return 0 and a finite
    log-sum-exp for such a row, so it is set to -inf before the merge)."""
    if documents is None:
        return diagonal_bias(B, V, T, device, dtype, clean), None, None
    d = documents[:, g * T:(g + 1) * T].repeat(1, V + 1)  # [b, R] rows of piece (b), in order
    diag = diagonal_mask(B, V, T, device, clean) & (d[:, :, None] == d[:, None, :])
    if not g:
        return _additive(diag[:, None], dtype), None, None
    prefix = d[:, :, None] == documents[:, None, :g * T]  # [b, R, gT]
    return _additive(diag[:, None], dtype), _additive(prefix[:, None], dtype), \
        ~prefix.any(-1)[:, None]


@functools.lru_cache(maxsize=64)
def diagonal_mask(block_size: int, views: int, tile: int, device: torch.device,
                  clean: str = "block_causal") -> torch.Tensor:
    """[(V+1)T, (V+1)T] mask of piece (b); rows and columns ordered clean tile, then the views.

    The layout's own mask (`AttentionLayout.mask_fn`, clean stream `clean`) over one tile of
    every stream: a tile holds whole blocks, so the same mask holds at every tile position."""
    from cascade_mega.diffusion.masks import AttentionLayout

    T, V = tile, views
    rows = torch.cat([torch.arange(V * T, (V + 1) * T), torch.arange(V * T)]).to(device)
    layout = AttentionLayout("block_diffusion", T, block_size, V, clean_stream=clean)
    return layout.mask_fn()(rows[:, None], rows[None, :])


def _tile_rows(L: int, V: int, T: int, i: int):
    """Row slices of tile i: the clean stream first, then each view (stream order of piece b)."""
    return [slice(V * L + i * T, V * L + (i + 1) * T)] + \
        [slice(s * L + i * T, s * L + (i + 1) * T) for s in range(V)]


def _merge(o_a, lse_a, o_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    return (torch.exp(lse_a - lse).unsqueeze(-1) * o_a +
            torch.exp(lse_b - lse).unsqueeze(-1) * o_b), lse


class _TiledBlockAttention(torch.autograd.Function):
    """Local rows: V views then the clean stream, each of `len(tiles) * T` rows; local tile j is
    tile `tiles[j]` of the whole sequence. The clean prefix is read from `clean_k/clean_v` (the
    whole clean stream, gathered across context-parallel ranks) or, when they are None, in place
    from the clean rows of k/v (all tiles are local)."""

    @staticmethod
    def forward(ctx, q, k, v, clean_k, clean_v, B, V, T, tiles, scale, documents, rule):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        Ll = len(tiles) * T
        clean = V * Ll
        pk, pv = (k[:, :, clean:], v[:, :, clean:]) if clean_k is None else \
            (clean_k.contiguous(), clean_v.contiguous())
        fwd, _ = tile_ops(q.device)
        extra = None
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32 if q.dtype != torch.float64
                          else torch.float64)
        for j, g in enumerate(tiles):
            rows = _tile_rows(Ll, V, T, j)
            qi = torch.cat([q[:, :, r] for r in rows], dim=2)
            kb = torch.cat([k[:, :, r] for r in rows], dim=2)
            vb = torch.cat([v[:, :, r] for r in rows], dim=2)
            mask, prefix, empty = tile_masks(B, V, T, g, documents, q.dtype, q.device, rule)
            o, l, extra = fwd(qi, kb, vb, mask, scale)
            if g:
                o_a, l_a, _ = fwd(qi, pk[:, :, :g * T], pv[:, :, :g * T], prefix, scale)
                l_a = l_a.to(l.dtype)
                if empty is not None:
                    l_a = l_a.masked_fill(empty, float("-inf"))
                    o_a = o_a.masked_fill(empty[..., None], 0.0)
                o, l = _merge(o_a, l_a, o, l)
            for i, r in enumerate(rows):
                out[:, :, r] = o[:, :, i * T:(i + 1) * T]
                lse[:, :, r] = l[:, :, i * T:(i + 1) * T]
        ctx.save_for_backward(q, k, v, pk, pv, out, lse)
        ctx.documents = documents
        ctx.shape = (B, V, T, tiles, scale, clean_k is not None, rule)
        ctx.extra = extra  # what the device's backward needs besides (e.g. CUDA's RNG state)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        B, V, T, tiles, scale, separate, rule = ctx.shape
        Ll = len(tiles) * T
        clean = V * Ll
        grad_out = grad_out.contiguous()
        _, bwd = tile_ops(q.device)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # prefix gradients: into the gathered clean stream, or in place into dk/dv's clean rows
        dpk, dpv = (torch.zeros_like(pk), torch.zeros_like(pv)) if separate else \
            (dk[:, :, clean:], dv[:, :, clean:])
        for j, g in enumerate(tiles):
            rows = _tile_rows(Ll, V, T, j)
            pick = lambda x: torch.cat([x[:, :, r] for r in rows], dim=2)  # noqa: E731
            qi, oi, gi, li = pick(q), pick(out), pick(grad_out), pick(lse)
            mask, prefix, _ = tile_masks(B, V, T, g, ctx.documents, q.dtype, q.device, rule)
            dqi, dkb, dvb = bwd(gi, qi, pick(k), pick(v), oi, li, mask, scale, ctx.extra)
            for i, r in enumerate(rows):
                dk[:, :, r] += dkb[:, :, i * T:(i + 1) * T]
                dv[:, :, r] += dvb[:, :, i * T:(i + 1) * T]
            if g:
                dqa, dka, dva = bwd(gi, qi, pk[:, :, :g * T], pv[:, :, :g * T], oi, li, prefix,
                                    scale, ctx.extra)
                dqi = dqi + dqa
                dpk[:, :, :g * T] += dka
                dpv[:, :, :g * T] += dva
            for i, r in enumerate(rows):
                dq[:, :, r] = dqi[:, :, i * T:(i + 1) * T]
        if not separate:
            dpk = dpv = None
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None


def block_diffusion_attention(q, k, v, seq_len: int, block_size: int, views: int = 1,
                              tile: int | None = None, scale: float | None = None, *,
                              chunks: tuple = (0,), num_chunks: int = 1, clean_kv=None,
                              documents=None, clean_stream: str = "block_causal"):
    """q: [b, h, (V+1)L, d]; k, v: [b, g, (V+1)L, d] (g divides h). Returns [b, h, (V+1)L, d].

    Context parallel: the rows are `chunks` (of `num_chunks`, each seq_len / num_chunks long) of
    every stream, and `clean_kv` = (k, v) of the whole clean stream [b, g, L, d]. views = 0 with
    block_size = 1 is causal attention over one stream (AR under context parallel).
    documents: [b, seq_len] document ids of packed sequences (`data.document_mask`), on q's
    device: every row attends only within its document. clean_stream: 'block_causal' or 'causal'
    (`AttentionLayout.clean_stream`: how the clean stream attends to itself).
    """
    C = seq_len // num_chunks
    T = tile or tile_size(C, block_size)
    if C * num_chunks != seq_len or C % T or T % block_size:
        raise ValueError(f"tile {T} must be a multiple of block size {block_size} dividing the "
                         f"chunk length {seq_len} / {num_chunks}")
    if num_chunks > 1 and clean_kv is None:
        raise ValueError("a context-parallel layout needs the gathered clean stream (clean_kv)")
    per = C // T
    tiles = tuple(c * per + t for c in chunks for t in range(per))
    clean_k, clean_v = clean_kv if clean_kv is not None else (None, None)
    return _TiledBlockAttention.apply(q, k, v, clean_k, clean_v, block_size, views, T, tiles,
                                      scale, documents, clean_stream)
