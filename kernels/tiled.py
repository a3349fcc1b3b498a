"""Block-diffusion attention as dense tiles: compute and memory follow the mask's non-zeros.

Layout: `[x_t^1 ; ... ; x_t^V ; x_0]`, each stream of length L, blocks of size B (V = 1 is the
usual 2L layout; V > 1 shares one clean stream between several noisy views). Rows are cut into
tiles of T positions (T a multiple of B dividing L). The queries of tile i of every stream
((V+1)T rows) need exactly two pieces:

  (a) the clean prefix x_0[0 : iT]: every block there is strictly earlier than the tile's blocks,
      so all of it is visible to every query row: one unmasked attention, keys read in place;
  (b) the diagonal: x_0[tile i] ++ x_t^1[tile i] ++ ... ++ x_t^V[tile i], under one small
      (V+1)T x (V+1)T mask (clean rows block-causal on x_0; view rows: strictly earlier clean
      blocks and their own view's block). The mask is the same for every tile, built once.

The two pieces are merged exactly through their log-sum-exp; the backward pass calls the fused
attention backward of each piece with the merged output and log-sum-exp (the ring-attention
identity), so nothing of the softmax is materialised. Cost: about L^2 + 3LT score entries for
V = 1, against 4L^2 for the dense mask and L^2/2 for AR causal attention. No (2L)^2 tensor exists.
"""

from __future__ import annotations

import functools

import torch

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def tile_size(seq_len: int, block_size: int, target: int = 128) -> int:
    """Largest multiple of block_size that divides seq_len and is <= max(target, block_size)."""
    best, t = block_size, block_size
    while t <= max(target, block_size):
        if seq_len % t == 0:
            best = t
        t += block_size
    return best


@functools.lru_cache(maxsize=64)
def diagonal_bias(block_size: int, views: int, tile: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """Piece (b)'s mask as the additive bias the fused kernel takes (0 or -inf, query dtype)."""
    allowed = diagonal_mask(block_size, views, tile, device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed,
                                                                              float("-inf"))


@functools.lru_cache(maxsize=64)
def diagonal_mask(block_size: int, views: int, tile: int, device: torch.device) -> torch.Tensor:
    """[(V+1)T, (V+1)T] mask of piece (b); rows and columns ordered clean tile, then the views."""
    T, V = tile, views
    blk = torch.arange(T, device=device) // block_size
    same, before = blk[:, None] == blk[None, :], blk[None, :] < blk[:, None]
    zeros = torch.zeros(T, T, dtype=torch.bool, device=device)
    rows = [torch.cat([same | before] + [zeros] * V, dim=1)]
    for v in range(V):
        rows.append(torch.cat([before] + [same if s == v else zeros for s in range(V)], dim=1))
    return torch.cat(rows, dim=0)


def _tile_rows(L: int, V: int, T: int, i: int):
    """Row slices of tile i: the clean stream first, then each view (stream order of piece b)."""
    return [slice(V * L + i * T, V * L + (i + 1) * T)] + \
        [slice(s * L + i * T, s * L + (i + 1) * T) for s in range(V)]


def _merge(o_a, lse_a, o_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    return (torch.exp(lse_a - lse).unsqueeze(-1) * o_a +
            torch.exp(lse_b - lse).unsqueeze(-1) * o_b), lse


class _TiledBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, L, B, V, T, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask = diagonal_bias(B, V, T, q.device, q.dtype)
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32 if q.dtype != torch.float64
                          else torch.float64)
        clean = V * L
        for i in range(L // T):
            rows = _tile_rows(L, V, T, i)
            qi = torch.cat([q[:, :, r] for r in rows], dim=2)
            kb = torch.cat([k[:, :, r] for r in rows], dim=2)
            vb = torch.cat([v[:, :, r] for r in rows], dim=2)
            o, l = _fwd(qi, kb, vb, 0.0, False, attn_mask=mask, scale=scale)
            if i:
                o_a, l_a = _fwd(qi, k[:, :, clean:clean + i * T], v[:, :, clean:clean + i * T],
                                0.0, False, scale=scale)
                o, l = _merge(o_a, l_a.to(l.dtype), o, l)
            for j, r in enumerate(rows):
                out[:, :, r] = o[:, :, j * T:(j + 1) * T]
                lse[:, :, r] = l[:, :, j * T:(j + 1) * T]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.shape = (L, B, V, T, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        L, B, V, T, scale = ctx.shape
        grad_out = grad_out.contiguous()
        mask = diagonal_bias(B, V, T, q.device, q.dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        clean = V * L
        for i in range(L // T):
            rows = _tile_rows(L, V, T, i)
            pick = lambda x: torch.cat([x[:, :, r] for r in rows], dim=2)  # noqa: E731
            qi, oi, gi, li = pick(q), pick(out), pick(grad_out), pick(lse)
            dqi, dkb, dvb = _bwd(gi, qi, pick(k), pick(v), oi, li, 0.0, False, attn_mask=mask,
                                 scale=scale)
            for j, r in enumerate(rows):
                dk[:, :, r] += dkb[:, :, j * T:(j + 1) * T]
                dv[:, :, r] += dvb[:, :, j * T:(j + 1) * T]
            if i:
                prefix = slice(clean, clean + i * T)
                dqa, dka, dva = _bwd(gi, qi, k[:, :, prefix], v[:, :, prefix], oi, li, 0.0,
                                     False, scale=scale)
                dqi = dqi + dqa
                dk[:, :, prefix] += dka
                dv[:, :, prefix] += dva
            for j, r in enumerate(rows):
                dq[:, :, r] = dqi[:, :, j * T:(j + 1) * T]
        return dq, dk, dv, None, None, None, None, None


def block_diffusion_attention(q, k, v, seq_len: int, block_size: int, views: int = 1,
                              tile: int | None = None, scale: float | None = None):
    """q: [b, h, (V+1)L, d]; k, v: [b, g, (V+1)L, d] (g divides h). Returns [b, h, (V+1)L, d]."""
    T = tile or tile_size(seq_len, block_size)
    if seq_len % T or T % block_size:
        raise ValueError(f"tile {T} must be a multiple of block size {block_size} dividing "
                         f"{seq_len}")
    return _TiledBlockAttention.apply(q, k, v, seq_len, block_size, views, T, scale)
