"""Training objectives on one model: block diffusion (B = 1 .. L) and the AR baseline.

views > 1: V noisy copies of each sequence share one clean stream, `[x_t^1 ; ... ; x_t^V ; x_0]`;
  `complementary` makes view 2 mask exactly what view 1 keeps (every token a target once per pair).
  The loss is the mean of the V NELBO estimates: identical to V separate 2L passes, fewer FLOPs.

block_diffusion, B < L: one forward over `[x_t ; x_0]` (2L tokens, same position ids for both
  halves) with the 2L mask; the loss is read off the x_t half only:
      NELBO = sum_blocks E_t[(1/t) sum_{masked i} -log p(x0_i | x_t block, clean prefix)] / #tokens
block_diffusion, B = L: full masked diffusion, one L-length forward with full attention.
shifted_prediction: x0_i is predicted from row i-1 (AR-style); the first token of a block from the
  clean stream's last row of the previous block; token 0 has no predecessor and is not a target.
ar: next-token prediction with a causal mask (labels = the sequence shifted by one).

document_mask (`data.document_mask`): in a packed sequence, attention stays inside each document and
  no target is predicted from another document (shifted prediction drops a document's first token,
  AR the token after an end-of-document), so the NELBO of a packed sequence is the sum of its
  documents' NELBOs, each computed alone (blocks stay where the packed positions put them).

ar_loss_weight > 0 (continued pretraining from an AR model): one more stream, the clean sequence
  under a causal mask attending only to itself, read out as next-token prediction; its summed CE
  times the weight joins the loss (reported apart from the NELBO as `ar_loss`).
block_size_schedule: `at_step(cfg, step)` is the config with the block size in force at a step.
  A phase at B = 1 trains the AR objective: with shifted prediction every B = 1 target is read
  from the clean stream's row before it, exactly AR's prediction, and the AR loss is the exact
  expectation of that NELBO over the noise (every token a target, weight 1), on L rows, not 2L.
distillation (`diffusion/distill.py`): `Prepared.target_pos` says which position each NELBO
  target is, so the teacher's next-token logits can be lined up with it.

context parallel: `prepare(..., context=(rank, size))` keeps this rank's zigzag chunks of every
  stream (`AttentionLayout.split_for_context`) and the targets whose predicting row is here; the
  per-rank losses, token counts and gradients sum to those of the whole sequence.

`prepare()` turns a batch of clean tokens into model inputs plus per-token loss weights, on the
host (the objective's batch moves the result to the device in one copy: `runtime/device.py`);
`reduce()` turns the model's per-token cross-entropy into the summed loss and the named
`LossSums`, on the device of the cross-entropy. The trainer reaches both through the
`BlockDiffusion` objective (`block.py`), the seam of `base.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from cascade_mega.diffusion.masks import AttentionLayout, document_ids, masked_share
from cascade_mega.diffusion.noise import Noise, complement, corrupt, draw
from cascade_mega.diffusion.noise import resample as resample_noise


@dataclass
class ReadOut:
    """Which sequence rows predict which targets (what the model's output processor reads,
    `model/gpt.py: predict_and_score`). rows: [n] row index (None: every row); labels: [b, n].

    teacher: [m, b, v/tp] a frozen teacher's logits for the first m targets (distillation)."""

    rows: Optional[torch.Tensor]
    labels: torch.Tensor
    teacher: Optional[torch.Tensor] = None
    # score entropy (`diffusion.loss`, `model/scores.py`): the leading `score_cols` targets (the
    # diffusion targets; the auxiliary AR stream's stay plain next-token CE) add g(Z / a)
    score_entropy: bool = False
    score_cols: Optional[int] = None


@dataclass
class Prepared:
    input_ids: torch.Tensor  # [b, S]
    position_ids: torch.Tensor  # [1, S]: every sequence of a batch has the same layout
    layout: AttentionLayout
    readout: ReadOut
    weight: torch.Tensor  # [b, n] fp64 loss weight per read-out target (1/t on masked, else 0)
    scored: torch.Tensor  # [b, n] bool: targets that count for accuracy (masked / all for AR)
    num_tokens: int  # denominator of the per-token NELBO
    aux_cols: int = 0  # trailing read-out columns of the auxiliary AR stream
    target_pos: Optional[torch.Tensor] = None  # [n - aux_cols] sequence position of each target
    distill_weight: Optional[torch.Tensor] = None  # [b, n - aux_cols] KL weight (distill.py)
    clean_tokens: Optional[torch.Tensor] = None  # [b, L] what a distillation teacher reads
    # num_tokens as a 0-dim int32 tensor (megatron's schedule sums it on the device): made on the
    # host by `prepare` and moved with the batch, so no step copies a Python number to the device
    count: Optional[torch.Tensor] = None
    # [b, S] float32 noise level of each row's block (clean rows 0), for a time-conditioned
    # model (`model.time_conditioning`, `model/noise_level.py`); None otherwise
    noise_levels: Optional[torch.Tensor] = None


@dataclass
class LossSums:
    """What one micro-batch adds to a step's metrics, by name: sums over its targets, added over
    micro-batches and ranks (`pack` lays them out as one float64 tensor for the all-reduce) and
    turned into per-token metrics once per logged step (`BlockDiffusion.metrics`)."""

    loss: torch.Tensor  # the NELBO (AR: the cross-entropy) summed over the targets
    tokens: torch.Tensor  # the per-token denominator (`Prepared.num_tokens`)
    correct: torch.Tensor  # correct arg-max predictions among the scored targets
    scored: torch.Tensor  # targets that count for accuracy (masked; every target for AR)
    ar_loss: torch.Tensor  # the auxiliary AR stream's cross-entropy sum (`ar_loss_weight`)
    ar_targets: torch.Tensor
    distill_kl: torch.Tensor  # the distillation KL sum (`distill.teacher`)
    distill_targets: torch.Tensor

    def pack(self) -> torch.Tensor:
        return torch.stack([getattr(self, f.name).double() for f in fields(self)])

    @classmethod
    def unpack(cls, values) -> "LossSums":
        """From a packed tensor (or its values read back to the host)."""
        return cls(*values)


def at_step(cfg, step: int):
    """The config with the block size `diffusion.block_size_schedule` puts in force at `step`."""
    schedule = cfg.diffusion.block_size_schedule
    if not schedule:
        return cfg
    block = schedule[max(s for s in schedule if s <= step)]
    d = replace(cfg.diffusion, block_size=block)
    if block == 1:  # an AR phase (shifted prediction, config check): see the module docstring
        d = replace(d, objective="ar", ar_loss_weight=0.0, block_size_schedule={},
                    clean_stream="block_causal")
    return replace(cfg, diffusion=d)


def shifted_rows(L: int, B: int, clean_offset: int | None, view_offset: int = 0) -> torch.Tensor:
    """Row that predicts target i (i = 1 .. L-1) under shifted prediction.

    Row i-1 of the same view, except a block's first token, which the clean stream's last row of
    the previous block predicts (when there is a clean stream, at `clean_offset`).
    """
    i = torch.arange(1, L)
    rows = view_offset + i - 1
    if clean_offset is not None:
        rows = torch.where(i % B == 0, clean_offset + i - 1, rows)
    return rows


def train_range(cfg, clip=None) -> tuple:
    """The noise levels training draws: the clipped range (`clip`, e.g. the one a schedule
    search chose, else [t_min, t_max]) above `diffusion.t_floor` (and, for complementary views,
    below 1 - t_floor, so that the second view's 1 - t is above it too)."""
    d = cfg.diffusion
    t_min, t_max = clip if clip is not None else (d.t_min, d.t_max)
    low, high = max(t_min, d.t_floor), t_max
    if d.complementary:
        high = min(high, 1.0 - d.t_floor)
    return low, high


def valid_range(cfg) -> tuple:
    """The noise levels validation draws: the whole range above `diffusion.t_floor`, (t_floor, 1]
    (complementary views: below 1 - t_floor too, so the second view's 1 - t is above it).

    Without the floor a 1/t weight has infinite variance, and validation's noise is fixed per
    (seed, shape): one rare tiny t would shift a whole run's curve. With it the weights are
    bounded by 1 / t_floor, and the estimate leaves out the sliver (0, t_floor] of the bound's
    integral while the rest is spread over (t_floor, 1]: in expectation it exceeds the NELBO by
    t_floor (NELBO - the sliver's rate) / (1 - t_floor), of the floor's order (1e-3 nats at the
    default), and stays above it where the loss grows with t (bd3lms and MDLM floor it too)."""
    d = cfg.diffusion
    return d.t_floor, 1.0 - d.t_floor if d.complementary else 1.0


def draw_noise(cfg, n: int, generator: torch.Generator, t_range=None, resample=None) -> Noise:
    """Noise for n sequences under the run's diffusion settings (t_range overrides the clip);
    `resample` = [t_min, t_max]: each block's realised masked fraction clipped into it
    (`diffusion.resample`, `noise.resample`; before the complement, which keeps it in a
    symmetric range)."""
    d = cfg.diffusion
    t_min, t_max = t_range if t_range is not None else (d.t_min, d.t_max)
    noise = draw(n, cfg.data.seq_len, d.block_size, generator, d.noise_sampling == "stratified",
                 t_min, t_max, views=1 if d.complementary else d.views)
    if resample is not None:
        noise = resample_noise(noise, min(d.block_size, cfg.data.seq_len), *resample, generator)
    return complement(noise) if d.complementary else noise


def common_targets(tokens: torch.Tensor, eod_id) -> torch.Tensor:
    """[b, L] the targets every objective predicts: tokens 1 .. L-1 of the window that do not
    open a document (the first token of a window or of a document has no predecessor in a
    shifted-prediction or document-masked run, and AR's label L has no diffusion target)."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    if eod_id is not None:
        keep[:, 1:] &= tokens[:, :-1] != eod_id
    return keep


def prepare(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, cfg, mask_id: int,
            noise, *, t_range=None, context=(0, 1), eod_id=None, common=False) -> Prepared:
    """tokens/labels/loss_mask: [b, L] as megatron's GPT dataset yields them.

    noise: a `Noise` for these b sequences, or a torch.Generator to draw one from.
    context: (rank, size) of the context-parallel group.
    eod_id: the end-of-document token (needed by `data.document_mask`).
    common: score only `common_targets`, the others given (never masked): the NELBO is then a
      bound on -log p(targets | the others), on the same tokens for every objective.
    """
    documents, ar_mask = None, loss_mask  # next-token rows: megatron's mask, which follows labels
    if common:
        keep = common_targets(tokens, eod_id)
        if cfg.diffusion.objective == "ar":  # label j is token j + 1
            loss_mask = loss_mask * torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], 1)
        else:
            if isinstance(noise, torch.Generator):
                noise = draw_noise(cfg, tokens.shape[0], noise, t_range)
            noise = Noise(noise.t, torch.where(keep[:, None, :], noise.u, 2.0))  # given
    if cfg.diffusion.objective != "ar":
        loss_mask = token_mask(loss_mask)
        if common:
            loss_mask = loss_mask * keep
    if cfg.data.document_mask:
        if eod_id is None:
            raise ValueError("data.document_mask needs the end-of-document token id (eod_id)")
        documents = document_ids(tokens, eod_id)
        ar_mask = ar_mask * (tokens != eod_id)  # an end-of-document's label opens the next one
        loss_mask = loss_mask * _within_document(tokens, documents, cfg, eod_id)
    prep = _prepare(tokens, labels, loss_mask, cfg, mask_id, noise, t_range)
    if cfg.diffusion.ar_loss_weight > 0:  # block diffusion only (config check)
        # a causal clean stream carries the next-token loss itself; full diffusion (B = L, a
        # phase of a block-size schedule) has no clean stream: the auxiliary one then
        causal_clean = cfg.diffusion.clean_stream == "causal" and \
            cfg.diffusion.block_size < cfg.data.seq_len
        prep = _add_causal_stream(prep, tokens, labels, ar_mask, cfg.diffusion.ar_loss_weight,
                                  causal_clean)
    if documents is not None:
        prep.layout = replace(prep.layout, documents=documents)
    routing = prep.num_tokens / prep.input_ids.numel()
    if context[1] > 1:
        counted = loss_mask.bool().clone()  # the positions num_tokens counts
        if cfg.diffusion.objective != "ar" and cfg.diffusion.shifted_prediction:
            counted[:, 0] = False  # token 0 has no predecessor
        prep = _split_for_context(prep, counted, *context)
    if not cfg.model.time_conditioning:
        prep.noise_levels = None  # only a time-conditioned model reads them
    if cfg.diffusion.loss == "score_entropy":  # block diffusion only (config check)
        prep.readout = replace(prep.readout, score_entropy=True,
                               score_cols=prep.readout.labels.shape[1] - prep.aux_cols)
    prep.count = torch.tensor(prep.num_tokens, dtype=torch.int)  # host: moved with the batch
    # loss tokens per row that passes through the model, over the whole micro-batch (every
    # context-parallel rank): how an MoE router scales its balancing loss (`model/moe.py`); it
    # travels in the layout, the forward's argument that reaches every layer
    prep.layout = replace(prep.layout, routing_scale=routing)
    return prep


def token_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """megatron's loss mask is over the labels (label i is token i + 1: 0 where it is padding);
    a diffusion target is the token itself, real where the label before it is (token 0 always).
    Without padding both are all ones."""
    return torch.cat([torch.ones_like(loss_mask[:, :1]), loss_mask[:, :-1]], dim=1)


def _within_document(tokens, documents, cfg, eod_id) -> torch.Tensor:
    """[b, L] 1 where the target is predicted from its own document, else 0."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    if cfg.diffusion.objective == "ar":
        keep = tokens != eod_id  # its label opens the next document
    elif cfg.diffusion.shifted_prediction:
        keep[:, 1:] = documents[:, 1:] == documents[:, :-1]  # predicted from the row before
    return keep


def _split_for_context(prep: Prepared, counted, rank: int, size: int) -> Prepared:
    layout = prep.layout.split_for_context(rank, size)
    held = layout.rows()
    local = torch.full((prep.layout.total_len,), -1, dtype=torch.long)
    local[held] = torch.arange(held.numel())
    rows = prep.readout.rows if prep.readout.rows is not None else \
        torch.arange(prep.layout.total_len)
    keep = local[rows] >= 0
    rows = local[rows[keep]]
    if torch.equal(rows, torch.arange(held.numel())):
        rows = None
    positions = held[:layout.local_len]  # the first stream's rows are its positions
    levels = None if prep.noise_levels is None else prep.noise_levels[:, held]
    return Prepared(prep.input_ids[:, held], prep.position_ids[:, held], layout,
                    ReadOut(rows, prep.readout.labels[:, keep].contiguous()),
                    prep.weight[:, keep], prep.scored[:, keep],
                    int(counted[:, positions].sum()), noise_levels=levels)


def _add_causal_stream(prep: Prepared, tokens, labels, ar_mask, weight: float,
                       causal_clean: bool = False) -> Prepared:
    """Append the clean sequence as a causal stream whose rows predict the next token; with a
    causal clean stream (`diffusion.clean_stream`), read those predictions from its rows."""
    b, L = tokens.shape
    start = prep.layout.total_len
    rows = prep.readout.rows if prep.readout.rows is not None else torch.arange(start)
    if causal_clean:  # the clean stream is the last one
        return replace(
            prep, readout=ReadOut(torch.cat([rows, start - L + torch.arange(L)]),
                                  torch.cat([prep.readout.labels, labels], 1)),
            weight=torch.cat([prep.weight, ar_mask.to(torch.float64) * weight], 1),
            scored=torch.cat([prep.scored, torch.zeros(b, L, dtype=torch.bool)], 1),
            aux_cols=L)
    return replace(
        prep, input_ids=torch.cat([prep.input_ids, tokens], 1),
        position_ids=torch.cat([prep.position_ids, torch.arange(L)[None]], 1),
        layout=replace(prep.layout, causal_stream=True),
        readout=ReadOut(torch.cat([rows, start + torch.arange(L)]),
                        torch.cat([prep.readout.labels, labels], 1)),
        weight=torch.cat([prep.weight, ar_mask.to(torch.float64) * weight], 1),
        scored=torch.cat([prep.scored, torch.zeros(b, L, dtype=torch.bool)], 1),
        aux_cols=L,  # host, like every tensor `prepare` makes (moved with the batch)
        noise_levels=torch.cat([prep.noise_levels, torch.zeros(b, L)], 1))


def _prepare(tokens, labels, loss_mask, cfg, mask_id, noise, t_range) -> Prepared:
    d = cfg.diffusion
    b, L = tokens.shape
    pos = torch.arange(L)[None]  # shared by the batch: RoPE's table broadcasts over it
    if d.objective == "ar":
        w = loss_mask.to(torch.float64)  # host, like every tensor `prepare` makes
        return Prepared(tokens, pos, AttentionLayout("causal", L), ReadOut(None, labels), w,
                        loss_mask.bool(), int(loss_mask.sum()), noise_levels=torch.zeros(b, L))
    B, V = d.block_size, d.views
    if isinstance(noise, torch.Generator):
        noise = draw_noise(cfg, b, noise, t_range)
    x_t, masked = corrupt(tokens, noise, mask_id)  # [b, V, L]
    # 1/t on masked tokens, averaged over the views (each view is an unbiased NELBO estimate)
    weight = torch.where(masked, 1.0 / noise.t, 0.0) / V
    clean_stream = B < L  # B = L: full diffusion, no clean stream
    streams = [x_t[:, v] for v in range(V)]
    # host (moved with the batch): each view's masked share per block (`model/noise_level.py`:
    # what a time-conditioned model reads everywhere), the clean stream's 0
    levels = [masked_share(x, mask_id, min(B, L)) for x in streams] + \
        [torch.zeros(b, L)] * clean_stream
    if clean_stream:
        input_ids = torch.cat(streams + [tokens], dim=1)
        position_ids = pos.repeat(1, V + 1)
        layout = AttentionLayout("block_diffusion", L, B, V, clean_stream=d.clean_stream)
    else:
        input_ids, position_ids = torch.cat(streams, dim=1), pos.repeat(1, V)
        layout = AttentionLayout("full", L, L, V)
    valid = loss_mask.bool()[:, None, :].expand(b, V, L)
    targets = tokens[:, None, :].expand(b, V, L)
    if d.shifted_prediction:
        clean_offset = V * L if clean_stream else None
        rows = torch.cat([shifted_rows(L, B, clean_offset, v * L) for v in range(V)])
        targets, weight = targets[..., 1:], weight[..., 1:]
        masked, valid = masked[..., 1:], valid[..., 1:]
        positions = torch.arange(1, L)
    else:
        rows, positions = torch.arange(V * L), torch.arange(L)
    weight = weight * valid
    n_per_view = targets.shape[-1]
    flat = lambda x: x.reshape(b, V * n_per_view)  # noqa: E731  [b, V, n] -> view-major rows
    return Prepared(input_ids, position_ids, layout, ReadOut(rows, flat(targets).contiguous()),
                    flat(weight), flat(masked & valid), int(valid[:, 0].sum()),
                    target_pos=positions.repeat(V), noise_levels=torch.cat(levels, 1))


def reduce(ce: torch.Tensor, correct: torch.Tensor, prep: Prepared, kl=None):
    """Summed weighted loss (for backward) and the micro-batch's `LossSums`. ce, correct: [b, n];
    kl: [b, n - aux_cols] per-target distillation KL, or None."""
    w = prep.weight.to(ce.dtype)
    n = ce.shape[1] - prep.aux_cols
    nelbo = (ce[:, :n] * w[:, :n]).sum()
    loss_sum = nelbo
    zero = torch.zeros((), dtype=torch.float64, device=ce.device)
    ar_sum = ar_count = kl_sum = kl_count = zero
    if prep.aux_cols:
        aux = w[:, n:]
        loss_sum = loss_sum + (ce[:, n:] * aux).sum()
        ar_sum, ar_count = (ce[:, n:].detach() * (aux > 0)).sum().double(), (aux > 0).sum().double()
    if kl is not None:
        kw = prep.distill_weight.to(kl.dtype)
        loss_sum = loss_sum + (kl * kw).sum()
        kl_sum, kl_count = (kl.detach() * (kw > 0)).sum().double(), (kw > 0).sum().double()
    scored = prep.scored
    # a Prepared made by hand (tests) may have no count: from the host, moved just below
    count = prep.count if prep.count is not None else torch.tensor(prep.num_tokens)
    return loss_sum, LossSums(nelbo.detach().double(), count.to(ce.device, torch.float64),
                              (correct & scored).sum().double(), scored.sum().double(),
                              ar_sum, ar_count, kl_sum, kl_count)
