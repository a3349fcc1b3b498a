"""Who may attend to whom, written from the definitions in docs/training.md with explicit loops, and
BD3-LM's published `block_diff_mask`. Deliberately shares nothing with
`cascade_mega.diffusion.masks`: it is what every mask the project derives is checked against.

Rows of a layout, stream by stream, L rows each:
  causal           one stream, causal;
  full             V streams (B = L), each attends to itself only (bidirectional);
  block_diffusion  V noisy streams x_t^1..x_t^V, then the clean stream x_0. A noisy row sees its
                   own view's block (M_BD) and the clean blocks strictly before (M_OBC); a clean row
                   the clean blocks up to its own (M_BC); the clean stream never sees x_t;
  causal_stream    one more stream at the end, the clean sequence, causal, attending only itself;
  clean="causal"   (`diffusion.clean_stream`) a clean row sees the clean rows up to its own
                   position instead of up to the end of its block;
  documents        [b][L] document ids: a row also sees only rows of its own document.
"""

from __future__ import annotations

import torch


def streams(kind: str, V: int, causal_stream: bool) -> int:
    return {"causal": 1, "full": V, "block_diffusion": V + 1}[kind] + int(causal_stream)


def allowed(kind, L, B, V, causal_stream, q, k, clean="block_causal") -> bool:
    n = streams(kind, V, causal_stream)
    sq, pq = divmod(q, L)
    sk, pk = divmod(k, L)
    if causal_stream and (sq == n - 1 or sk == n - 1):
        return sq == sk and pk <= pq
    if kind == "causal":
        return pk <= pq
    if kind == "full":
        return sq == sk
    bq, bk = pq // B, pk // B
    q_clean, k_clean = sq == V, sk == V
    if not q_clean and not k_clean:
        return sq == sk and bq == bk
    if not q_clean and k_clean:
        return bk < bq
    if q_clean and k_clean:
        return pk <= pq if clean == "causal" else bk <= bq
    return False


def reference(kind, L, B=1, V=1, causal_stream=False, documents=None,
              clean="block_causal") -> torch.Tensor:
    """[S, S] bool, or [b, 1, S, S] with documents."""
    S = streams(kind, V, causal_stream) * L
    base = [[allowed(kind, L, B, V, causal_stream, q, k, clean) for k in range(S)]
            for q in range(S)]
    if documents is None:
        return torch.tensor(base)
    docs = documents.tolist()
    return torch.tensor([[[[base[q][k] and d[q % L] == d[k % L] for k in range(S)]
                           for q in range(S)]] for d in docs])


def zigzag_rows(kind, L, V, causal_stream, rank, size) -> list:
    """Rows rank `rank` of a context-parallel group of `size` holds: chunks rank and
    2 size - 1 - rank of each stream cut into 2 size chunks (one chunk when size = 1)."""
    n = 2 * size if size > 1 else 1
    C = L // n
    held = (rank, 2 * size - 1 - rank) if size > 1 else (0,)
    return [s * L + c * C + i for s in range(streams(kind, V, causal_stream)) for c in held
            for i in range(C)]


def bd3lm_block_diff_mask(q_idx, kv_idx, block_size, n):
    """BD3-LM's `block_diff_mask` (Arriola et al. 2025, the paper's code), as published."""
    x0_flag_q = q_idx >= n
    x0_flag_kv = kv_idx >= n
    block_q = torch.where(x0_flag_q == 1, (q_idx - n) // block_size, q_idx // block_size)
    block_kv = torch.where(x0_flag_kv == 1, (kv_idx - n) // block_size, kv_idx // block_size)
    block_diagonal = (block_q == block_kv) & (x0_flag_q == x0_flag_kv)
    offset_block_causal = (block_q > block_kv) & (x0_flag_kv == 1) & (x0_flag_q == 0)
    block_causal = (block_q >= block_kv) & (x0_flag_kv == 1) & (x0_flag_q == 1)
    return block_diagonal | offset_block_causal | block_causal
