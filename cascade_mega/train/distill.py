"""Distillation from a frozen AR teacher (`distill.teacher`), CASCADE's continued-pretraining term.

For each masked target x_i of the denoiser, the teacher's next-token distribution
p_T(. | x_<i) (its causal pass over the clean sequence, row i-1) is the reference:

    loss += distill.weight * sum_{masked i} KL(p_T(. | x_<i) || p_theta(. | x_t, clean prefix))

Design choices:
- The teacher is a second megatron-core model built at the student's tensor-parallel layout and
  loaded from its own checkpoint (resharded on load), frozen and in eval mode. Its logits stay
  split over the vocabulary like the student's; the KL reduces across the tensor-parallel group
  (`model/gpt.py: vocab_parallel_kl`). Data-parallel ranks run it on their own micro-batches.
- One extra L-row forward per sequence without gradient, run when the micro-batch is prepared; the
  logits travel to the student's output layer in its `ReadOut`, lined up with the targets.
- Pipeline and context parallel are refused by the config check: the teacher would need its own
  pipeline schedule, or rows held by other context-parallel ranks.
- The teacher must share the student's vocabulary (same tokenizer, same padded size): both come
  from one `cascade convert` of the same AR model, or the teacher from the student's data.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cascade_mega.config import ConfigError
from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.model.gpt import ReadOut, build_model, padded_vocab_size, read_out_logits


def _vocab_rows(cfg, vocab_size: int) -> int:
    return cfg.model.vocab_size or padded_vocab_size(
        vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)


def teacher_config(cfg, vocab_size: int):
    """The teacher's run config at the student's layout, checked against the student (vocab_size:
    the tokenizer's) before any model is built."""
    from cascade_mega.config import load_config
    from cascade_mega.inference.load import locate

    path = cfg.distill.teacher
    config, ckpt = locate(path)
    p = cfg.parallel
    teacher = load_config(config, [f"parallel.tensor={p.tensor}", "parallel.pipeline=1",
                                   "parallel.context=1", "parallel.virtual_pipeline=null",
                                   f"parallel.sequence_parallel={p.sequence_parallel}",
                                   "model.recompute=none"], world_size=0)
    if teacher.diffusion.objective != "ar":
        raise ConfigError(f"'distill.teacher' = {path} is a {teacher.diffusion.objective} model; "
                          "the teacher must be an AR model (diffusion.objective = ar)")
    if _vocab_rows(teacher, vocab_size) != _vocab_rows(cfg, vocab_size):
        raise ConfigError(f"'distill.teacher' = {path} has a vocabulary of "
                          f"{_vocab_rows(teacher, vocab_size)} rows, the student "
                          f"{_vocab_rows(cfg, vocab_size)}: they must share one tokenizer")
    if teacher.data.seq_len < cfg.data.seq_len:
        teacher = replace(teacher, data=replace(teacher.data, seq_len=cfg.data.seq_len))
    return teacher, ckpt


def build_teacher(tcfg, ckpt: str, tokenizer, dtype):
    """The frozen teacher (config and checkpoint from `teacher_config`) at this rank's
    tensor-parallel layout."""
    from cascade_mega.train import checkpoint

    teacher = build_model(tcfg, tokenizer.vocab_size, forbidden_ids=[tokenizer.mask_id],
                          dtype=dtype)
    try:
        checkpoint.load(ckpt, [teacher], None, None)
    except Exception as err:
        raise ConfigError(f"'distill.teacher' = {ckpt}: the checkpoint does not load into its "
                          f"config ({str(err).splitlines()[0][:200]})") from None
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _teacher_logits(*, hidden_states, output_layer, output_weight, context, **_unused):
    logits = read_out_logits(hidden_states, output_layer, output_weight, context, False)
    return logits.float().add_(output_layer.logit_bias)


@torch.no_grad()
def attach(prep, teacher, tokens: torch.Tensor, weight: float):
    """The teacher's logits for the NELBO targets of `prep` (clean tokens [b, L]) and their KL
    weights: masked targets that have a predecessor in their own document."""
    b, L = tokens.shape
    documents = prep.layout.documents
    layout = AttentionLayout("causal", L, documents=documents)
    pos = prep.target_pos
    rows = (pos - 1).clamp(min=0)
    logits = teacher(tokens, torch.arange(L).expand(b, L), layout,
                     output_processor=_teacher_logits, output_processor_context=rows)
    n = pos.numel()
    keep = prep.scored[:, :n] & (pos > 0)
    if documents is not None:
        keep &= documents[:, pos] == documents[:, rows]
    readout = ReadOut(prep.readout.rows, prep.readout.labels, teacher=logits)
    return replace(prep, readout=readout, distill_weight=keep.to(torch.float64) * weight)
