"""Scores of a continuation given a context, from the megatron model on one process.

AR checkpoints: the exact log-likelihood, sum_i log p(cont_i | context, cont_<i), from one causal
forward (the last `seq_len` + 1 tokens when longer).

Block- and full-diffusion checkpoints have no tractable likelihood; what they give is the NELBO,
an upper bound on -log p(cont | context), estimated by Monte Carlo over the noise (as LLaDA
evaluates):
    -log p(cont | ctx) <= sum_blocks E_t E_mask[(1/t) sum_{masked i} -log p(cont_i | x_t, x_<block)]
- blocks are aligned from position 0 of context + continuation, as in decoding; the context is
  given as clean tokens (never masked, never a target); the rest of the last block, after the
  continuation, is [MASK] (unknown, as in decoding's last block); a full-diffusion model's canvas
  is [MASK] up to its context length;
- each block draws its own t ~ U(0, 1] (linear schedule), stratified over the `samples` draws
  (t_s = 1 - (s + U) / S, one U per block: every draw of a block lies in its own stratum);
  each continuation token is masked with probability t;
- the draws come from a generator seeded by the context (and `seed`), so every choice of one
  question sees the same t and the same uniforms at the positions they share: choices are
  compared on equal terms, and a rerun gives the same figures.
One 2L-layout forward (the objective's own `prepare`, one view, no auxiliary stream) scores every
block of a draw at once. Reported as `loglikelihood = -NELBO`, a lower bound.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace
from typing import List, Sequence, Tuple

import torch

from cascade_mega.config.objectives import layout_of
from cascade_mega.diffusion.noise import Noise
from cascade_mega.diffusion.objective import prepare
from cascade_mega.model.gpt import logits_at_rows, predict_and_score
from cascade_mega.runtime.device import to_device


def fit(context: List[int], continuation: List[int], limit: int):
    """The last `limit` tokens of context + continuation, split back into the two."""
    whole = (context + continuation)[-limit:]
    keep = min(len(continuation), len(whole) - 1)
    return whole[:len(whole) - keep], whole[len(whole) - keep:]


@torch.no_grad()
def ar_scores(model, cfg, pairs: Sequence[Tuple[List[int], List[int]]], batch: int = 16):
    """(log-likelihood, is_greedy) of each (context, continuation) pair: exact."""
    from cascade_mega.diffusion.masks import AttentionLayout

    L, out = cfg.data.seq_len, []
    for start in range(0, len(pairs), batch):
        chunk = [fit(c, x, L + 1) for c, x in pairs[start:start + batch]]
        width = max(len(c) + len(x) - 1 for c, x in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # right padding: never seen
        for i, (c, x) in enumerate(chunk):
            seq = (c + x)[:-1]
            ids[i, :len(seq)] = torch.tensor(seq)
        layout = AttentionLayout("causal", width)
        ids_d, pos = to_device((ids, torch.arange(width)[None]))
        logits = model(ids_d, pos, layout, output_processor=logits_at_rows,
                       output_processor_context=None)  # [n, b, V]
        logp = logits.transpose(0, 1).double().log_softmax(-1)
        for i, (c, x) in enumerate(chunk):
            rows = torch.arange(len(c) - 1, len(c) - 1 + len(x))
            target = torch.tensor(x, device=logp.device)
            picked = logp[i, rows.to(logp.device)]
            out.append((float(picked.gather(1, target[:, None]).sum()),
                        bool((picked.argmax(-1) == target).all())))
    return out


def question_seed(context: List[int], seed: int) -> int:
    return zlib.crc32(bytes(str(context), "ascii")) ^ seed


def scoring_config(cfg):
    """The run's config for scoring: one view, no auxiliary AR stream, no document mask."""
    d = replace(cfg.diffusion, views=1, complementary=False, ar_loss_weight=0.0,
                block_size_schedule={})
    return replace(cfg, diffusion=d, data=replace(cfg.data, document_mask=False))


def _noise(cfg, samples: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[samples, L] noise levels (stratified per block) and uniforms, for the whole context."""
    L, B = cfg.data.seq_len, cfg.diffusion.block_size
    g = torch.Generator().manual_seed(seed)
    blocks = math.ceil(L / B)
    offset = torch.rand(blocks, generator=g, dtype=torch.float64)
    t = 1.0 - (torch.arange(samples, dtype=torch.float64)[:, None] + offset) / samples
    u = torch.rand(samples, L, generator=g, dtype=torch.float64)
    return t.repeat_interleave(B, dim=1)[:, :L], u


@torch.no_grad()
def nelbo_bounds(model, cfg, mask_id: int, context: List[int], continuations: List[List[int]],
                 samples: int, seed: int = 0, batch: int = 64) -> List[Tuple[float, float]]:
    """(NELBO estimate, its standard error) of each continuation of one context, in nats."""
    cfg = scoring_config(cfg)
    L, B = cfg.data.seq_len, cfg.diffusion.block_size
    full = layout_of(cfg).kind == "full"
    fitted = [fit(context, x, L) for x in continuations]
    P = L if full else math.ceil(max(len(c) + len(x) for c, x in fitted) / B) * B
    t, u = _noise(cfg, samples, question_seed(context, seed))
    t, u = t[:, :P], u[:, :P]
    rows = []  # (tokens [P], targets [P] bool) of every (choice, draw)
    for c, x in fitted:
        tokens = torch.full((P,), mask_id, dtype=torch.long)
        tokens[:len(c) + len(x)] = torch.tensor(c + x)
        target = torch.zeros(P, dtype=torch.bool)
        target[len(c):len(c) + len(x)] = True
        rows.append((tokens, target, len(c) + len(x)))
    per_row = []
    items = [(k, s) for k in range(len(rows)) for s in range(samples)]
    for start in range(0, len(items), batch):
        part = items[start:start + batch]
        tokens = torch.stack([rows[k][0] for k, _ in part])
        target = torch.stack([rows[k][1] for k, _ in part])
        ends = torch.tensor([rows[k][2] for k, _ in part])
        uu = torch.stack([u[s] for _, s in part]).clone()
        tail = torch.arange(P)[None] >= ends[:, None]
        uu[~target & ~tail] = 2.0  # context: never masked (u >= t)
        uu[tail] = -1.0  # after the continuation: always [MASK]
        noise = Noise(torch.stack([t[s] for _, s in part])[:, None], uu[:, None])
        # megatron's loss mask follows labels (label i is token i + 1): the targets, shifted
        loss_mask = torch.cat([target[:, 1:], torch.zeros_like(target[:, :1])], 1).float()
        prep = prepare(tokens, tokens, loss_mask, cfg, mask_id, noise)
        ids, pos, read_rows, labels, levels = to_device((
            prep.input_ids, prep.position_ids, prep.readout.rows, prep.readout.labels,
            prep.noise_levels))
        readout = replace(prep.readout, rows=read_rows, labels=labels)
        ce, _ = model(ids, pos, prep.layout, output_processor=predict_and_score,
                      output_processor_context=readout, noise_levels=levels)
        # the rows after the continuation are [MASK] targets of weight 0 (their CE is inf)
        ce = ce.double().cpu()
        per_row += torch.where(prep.weight > 0, ce * prep.weight, 0.0).sum(1).tolist()
    out = []
    for k in range(len(rows)):
        values = torch.tensor(per_row[k * samples:(k + 1) * samples], dtype=torch.float64)
        se = float(values.std() / math.sqrt(samples)) if samples > 1 else float("nan")
        out.append((float(values.mean()), se))
    return out
