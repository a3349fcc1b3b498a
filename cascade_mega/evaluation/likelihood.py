"""Scores of a continuation given a context, from the megatron model on one process.

AR checkpoints: the exact log-likelihood, sum_i log p(cont_i | context, cont_<i), from one causal
forward (the last `seq_len` + 1 tokens when longer).

Block- and full-diffusion checkpoints have no tractable likelihood; what they give is the NELBO,
an upper bound on -log p(cont | context): per block, with t ~ U(0, 1] and each of the block's
n continuation tokens (its targets) masked with probability t,
    -log p(cont | ctx) <= sum_blocks E_t E_mask[(1/t) sum_{masked i} -log p(cont_i | x_t, x_<block)]
- blocks are aligned from position 0 of context + continuation, as in decoding; the context is
  given as clean tokens (never masked, never a target); the rest of the last block, after the
  continuation, is [MASK] (unknown, as in decoding's last block); a full-diffusion model's canvas
  is [MASK] up to its context length.
How it is estimated (as LLaDA's and dllm's MDLM evaluations do): t is integrated out. A pattern
with k of the n targets masked has probability t^k (1-t)^(n-k), and its weight E_t[t^(k-1)
(1-t)^(n-k)] = (k-1)! (n-k)! / n! = (1/n) (n/k) / C(n, k), so a block's term is
    sum_{k=1..n} (1/n) (n/k) E_{|M| = k}[sum_{i in M} -log p(cont_i | ...)],
the masked count k uniform on {1..n}, the masked set uniform among the k-subsets, weight n/k.
The 1/t weight has an infinite second moment (t near 0 with a token masked); n/k <= n is bounded,
and a 1-token block is exact (k = 1: the token masked, weight 1).
- the draws: the S draws fall in m = S // 2 strata of {1..n}, two draws each (three in the last
  when S is odd): draw s of stratum j masks k = 1 + floor((j + U) n / m) targets, U uniform and
  independent per draw and block (every stratum covered evenly: k uniform on {1..n} over the
  strata; S a multiple of 2n puts each stratum on one k), the k targets with the smallest of the
  draw's uniforms (a uniformly random subset). A draw's strata are the same in every block;
- the estimate: the strata's means averaged (the plain mean when S is even); its standard error
  from the spread within each stratum, se^2 = sum_j var_j / (c_j m^2) over strata of c_j draws.
  Two independent draws per stratum make that unbiased, which no formula is for one draw per
  stratum or one offset shared by the strata (a systematic sample): the iid formula over the
  draws counts the spread between strata (the trend of the loss in k) that stratification
  removed, successive differences count part of it, and a shared offset moves every draw's k
  together, a spread no difference between draws sees. Wider strata cost little: within a
  stratum the loss varies with the subset far more than with k (docs/results.md);
- a time-conditioned model is fed, for each block, the share of its positions that are [MASK]
  (the masked targets and, in the last block, the tail): what decoding feeds a block in the same
  state (`inference/decode.py`, `model/noise_level.py`). With the noise level a function of the
  masked pattern alone, integrating t out is exact for it too (fed t itself it would not be);
- the draws come from a generator seeded by the context (and `seed`), so every choice of one
  question sees the same U of each draw and block and the same uniforms at the positions they share
  (choices with a block's same targets mask the same subsets): choices are compared on equal
  terms, and a rerun gives the same figures.
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
    """[samples, blocks] uniforms (where each draw's masked count sits in its stratum) and
    [samples, L] uniforms (which targets it masks), for the whole context."""
    L, B = cfg.data.seq_len, cfg.diffusion.block_size
    g = torch.Generator().manual_seed(seed)  # host on purpose: the rows are laid out there
    offset = torch.rand(samples, math.ceil(L / B), generator=g, dtype=torch.float64)
    return offset, torch.rand(samples, L, generator=g, dtype=torch.float64)


def strata(samples: int) -> Tuple[torch.Tensor, int]:
    """The stratum of each draw ([samples]) and the number of strata m: two draws per stratum
    (three in the last one when `samples` is odd; one stratum below 4 draws)."""
    m = max(1, samples // 2)
    return torch.arange(samples).div(2, rounding_mode="floor").clamp(max=m - 1), m


def masked_counts(offset: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[S, blocks] masked counts k = 1 + floor((j + U) n_b / m) of draws in strata j of m: k is
    uniform on {1..n_b} over the strata; 0 where a block has no target. offset: [S, blocks] U;
    n: [blocks] targets per block."""
    j, m = strata(offset.shape[0])
    k = 1 + torch.floor((j[:, None] + offset) * n / m).long()
    return torch.minimum(k, n).where(n > 0, 0)  # min: rounding at U -> 1


def draws(offset: torch.Tensor, u: torch.Tensor, target: torch.Tensor, block: int):
    """The masked targets [S, P] of every draw and the per-block k / n [S, P] (1 where a block
    has no target), for one continuation's targets [P] (P a multiple of `block`)."""
    S, P = u.shape
    blocks = P // block
    n = target.view(blocks, block).sum(1)
    k = masked_counts(offset[:, :blocks], n)  # [S, blocks]
    ranked = torch.where(target, u, math.inf).view(S, blocks, block).argsort(-1).argsort(-1)
    masked = (ranked < k[..., None]).view(S, P) & target
    t = torch.where(n > 0, k / n.clamp(min=1), 1.0).repeat_interleave(block, dim=1)
    return masked, t


def estimate(values: torch.Tensor) -> Tuple[float, float]:
    """(mean, standard error) of per-draw values [S] under `strata`: the strata's means averaged,
    the error from the spread within each stratum (module docstring)."""
    j, m = strata(values.numel())
    j = j.to(values.device)
    count = values.new_zeros(m).index_add_(0, j, torch.ones_like(values))
    means = values.new_zeros(m).index_add_(0, j, values) / count
    if values.numel() < 2:
        return float(means.mean()), float("nan")
    within = values.new_zeros(m).index_add_(0, j, (values - means[j]) ** 2)
    return float(means.mean()), float((within / (count - 1) / count).sum().sqrt() / m)


@torch.no_grad()
def nelbo_bounds(model, cfg, mask_id: int, context: List[int], continuations: List[List[int]],
                 samples: int, seed: int = 0, batch: int = 64) -> List[Tuple[float, float]]:
    """(NELBO estimate, its standard error) of each continuation of one context, in nats."""
    cfg = scoring_config(cfg)
    L, B = cfg.data.seq_len, cfg.diffusion.block_size
    full = layout_of(cfg).kind == "full"
    fitted = [fit(context, x, L) for x in continuations]
    P = L if full else math.ceil(max(len(c) + len(x) for c, x in fitted) / B) * B
    offset, u = _noise(cfg, samples, question_seed(context, seed))
    u = u[:, :P]
    rows = []  # tokens [P], and the [S, P] masks and k / n of each choice's draws
    for c, x in fitted:
        tokens = torch.full((P,), mask_id, dtype=torch.long)
        tokens[:len(c) + len(x)] = torch.tensor(c + x)
        target = torch.zeros(P, dtype=torch.bool)
        target[len(c):len(c) + len(x)] = True
        masked, t = draws(offset, u, target, B)
        # host, like the rows it marks (they cross with the batch): after the continuation,
        # always [MASK]
        masked |= torch.arange(P) >= len(c) + len(x)
        rows.append((tokens, target, masked, t))
    per_row = []
    items = [(k, s) for k in range(len(rows)) for s in range(samples)]
    for start in range(0, len(items), batch):
        part = items[start:start + batch]
        tokens = torch.stack([rows[k][0] for k, _ in part])
        target = torch.stack([rows[k][1] for k, _ in part])
        # masked iff u < t: t = k / n on the block, so the objective's weight 1/t is n / k
        uu = torch.stack([torch.where(rows[k][2][s], -1.0, 2.0) for k, s in part])
        t = torch.stack([rows[k][3][s] for k, s in part])
        # megatron's loss mask follows labels (label i is token i + 1): the targets, shifted
        loss_mask = torch.cat([target[:, 1:], torch.zeros_like(target[:, :1])], 1).float()
        prep = prepare(tokens, tokens, loss_mask, cfg, mask_id, Noise(t[:, None], uu[:, None]))
        # a time-conditioned model reads each block's [MASK] share (`prepare`, as everywhere)
        ids, pos, read_rows, labels, levels = to_device((
            prep.input_ids, prep.position_ids, prep.readout.rows, prep.readout.labels,
            prep.noise_levels))
        readout = replace(prep.readout, rows=read_rows, labels=labels)
        ce, _ = model(ids, pos, prep.layout, output_processor=predict_and_score,
                      output_processor_context=readout, noise_levels=levels)
        # the rows after the continuation are [MASK] targets of weight 0 (their CE is inf)
        ce = ce.double().cpu()
        per_row += torch.where(prep.weight > 0, ce * prep.weight, 0.0).sum(1).tolist()
    # host floats (read back above): the estimate is a few host operations per question
    return [estimate(torch.tensor(per_row[k * samples:(k + 1) * samples], dtype=torch.float64))
            for k in range(len(rows))]
