"""Distillation from a frozen AR teacher (`distill.teacher`), CASCADE's continued-pretraining term.

For each masked target x_i of the denoiser, the teacher's next-token distribution
p_T(. | x_<i) (its causal pass over the clean sequence, row i-1) is the reference:

    loss += distill.weight * sum_{masked i} KL(p_T(. | x_<i) || p_theta(. | x_t, clean prefix))

(with V noisy views, the mean over the views, like the NELBO).

Design choices:
- The teacher is a second megatron-core model built at the student's tensor-parallel layout and
  loaded from its own checkpoint (resharded on load), frozen and in eval mode. Its logits stay
  split over the vocabulary like the student's; the KL reduces across the tensor-parallel group
  (`model/gpt.py: vocab_parallel_kl`). Data-parallel ranks run it on their own micro-batches.
- One extra L-row forward per sequence without gradient, in the same forward step as the student;
  the logits travel to the student's output layer in its `ReadOut`, lined up with the targets.
- Pipeline parallel: each stage holds the teacher's layers of that stage (same hidden size as the
  student), and the teacher's hidden rows travel between stages with the student's, in one tensor
  (megatron-core's schedule sends one tensor per micro-batch).
- Context parallel is refused by the config check: a target's teacher row can sit on another
  context-parallel rank.
- The teacher must share the student's vocabulary (same tokenizer, same padded size): both come
  from one `cascade convert` of the same AR model, or the teacher from the student's data.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cascade_mega.config import ConfigError
from cascade_mega.data.tokenizer import same_tokenizer
from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.model.gpt import build_chunks, logits_at_rows, vocab_rows


def teacher_config(cfg, tokenizer):
    """The teacher's run config at the student's layout, checked against the student (its
    tokenizer, vocabulary, hidden size) before any model is built."""
    from cascade_mega.config import load_config
    from cascade_mega.checkpoint import CheckpointError, locate

    path = cfg.distill.teacher
    try:
        config, ckpt = locate(path)
    except CheckpointError as err:
        raise ConfigError(f"'distill.teacher': {err}") from None
    p = cfg.parallel
    try:
        teacher = load_config(config, [f"parallel.tensor={p.tensor}",
                                       f"parallel.pipeline={p.pipeline}", "parallel.context=1",
                                       "parallel.virtual_pipeline=null",
                                       f"parallel.sequence_parallel={p.sequence_parallel}",
                                       "model.recompute=none"], world_size=0)
    except ConfigError as err:
        raise ConfigError(f"'distill.teacher' = {path} at the student's layout: {err}") from None
    if teacher.diffusion.objective != "ar":
        raise ConfigError(f"'distill.teacher' = {path} is a {teacher.diffusion.objective} model; "
                          "the teacher must be an AR model (diffusion.objective = ar)")
    _same_tokenizer(teacher, tokenizer, path)
    vocab_size = tokenizer.vocab_size
    if vocab_rows(teacher, vocab_size) != vocab_rows(cfg, vocab_size):
        raise ConfigError(f"'distill.teacher' = {path} has a vocabulary of "
                          f"{vocab_rows(teacher, vocab_size)} rows, the student "
                          f"{vocab_rows(cfg, vocab_size)}: they must share one tokenizer")
    if p.pipeline > 1 and teacher.model.hidden_size != cfg.model.hidden_size:
        raise ConfigError(f"'distill.teacher' = {path} has hidden size "
                          f"{teacher.model.hidden_size}, the student {cfg.model.hidden_size}: "
                          "under pipeline parallel both travel between stages in one tensor")
    return replace(teacher, data=replace(teacher.data, seq_len=cfg.data.seq_len)), ckpt


def _same_tokenizer(teacher, tokenizer, path: str) -> None:
    """The teacher reads the student's token ids: its own tokenizer must be the same one."""
    from cascade_mega.data import loader

    try:
        if teacher.data.tokenizer:
            from cascade_mega.data.tokenizer import open_tokenizer

            own = open_tokenizer(teacher.data.tokenizer)
        else:
            own = loader.load_tokenizer(teacher.data, loader.resolve_path(teacher.data.path))
    except Exception as err:  # noqa: BLE001  the teacher's record of its tokenizer is unreadable
        raise ConfigError(f"'distill.teacher' = {path}: its tokenizer cannot be read "
                          f"({str(err).splitlines()[0][:200]})") from None
    if not same_tokenizer(own, tokenizer):
        raise ConfigError(f"'distill.teacher' = {path} uses another tokenizer than the student "
                          "(the KL compares distributions over the same token ids)")


def build_teacher(tcfg, ckpt: str, tokenizer, dtype):
    """The frozen teacher (config and checkpoint from `teacher_config`): this rank's tensor-parallel
    share of this pipeline stage's layers."""
    from cascade_mega import checkpoint

    teacher, = build_chunks(tcfg, tokenizer, dtype)  # the teacher has no virtual stages
    try:
        checkpoint.load(ckpt, [teacher], None, None)
    except checkpoint.RefusedCheckpoint as err:
        raise ConfigError(f"'distill.teacher' = {ckpt}: {err}") from None
    except Exception as err:
        raise ConfigError(f"'distill.teacher' = {ckpt}: the checkpoint does not load into its "
                          f"config ({str(err).splitlines()[0][:200]})") from None
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def targets(prep, tokens: torch.Tensor, weight: float):
    """`prep` with the KL weight of each NELBO target (masked targets that have a predecessor in
    their own document) and the clean tokens [b, L] the teacher reads."""
    pos = prep.target_pos
    rows = (pos - 1).clamp(min=0)
    keep = prep.scored[:, :pos.numel()] & (pos > 0)
    documents = prep.layout.documents
    if documents is not None:
        keep &= documents[:, pos] == documents[:, rows]
    views = prep.layout.views  # averaged over the noisy views, like the NELBO
    return replace(prep, distill_weight=keep.to(torch.float64) * (weight / views),
                   clean_tokens=tokens)


def forward(model, teacher, prep):
    """One micro-batch through the student and the teacher at this pipeline stage.

    Last stage: the student's (ce, correct, kl), the teacher's logits at the rows that predict
    the NELBO targets riding in the student's `ReadOut`. Other stages: both models' hidden rows as
    one tensor `[student ; teacher]` (the schedule's sequence length counts both, `extra_rows`),
    split again by the next stage; under sequence parallel each rank's share of both.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model

    from cascade_mega.model.gpt import predict_and_score

    tokens = prep.clean_tokens
    b, L = tokens.shape
    if not ps.is_pipeline_first_stage():
        decoder = get_attr_wrapped_model(model, "decoder")
        both = decoder.input_tensor
        n = both.shape[0] - _local_rows(teacher, L)
        decoder.input_tensor, teacher.decoder.input_tensor = both[:n], both[n:]
    rows = (prep.target_pos - 1).clamp(min=0)
    layout = AttentionLayout("causal", L, documents=prep.layout.documents)
    with torch.no_grad():
        taught = teacher(tokens, torch.arange(L, device=tokens.device)[None], layout,
                         output_processor=logits_at_rows, output_processor_context=rows)
    if ps.is_pipeline_last_stage():
        return model(prep.input_ids, prep.position_ids, prep.layout,
                     output_processor=predict_and_score,
                     output_processor_context=replace(prep.readout, teacher=taught),
                     noise_levels=prep.noise_levels)
    return torch.cat([model(prep.input_ids, prep.position_ids, prep.layout,
                            noise_levels=prep.noise_levels), taught])


def extra_rows(cfg) -> int:
    """Rows the teacher adds to what the pipeline schedule sends between stages."""
    return cfg.data.seq_len if cfg.distill.teacher and cfg.parallel.pipeline > 1 else 0


def _local_rows(teacher, L: int) -> int:
    from megatron.core import parallel_state as ps

    sp = teacher.config.sequence_parallel
    return L // ps.get_tensor_model_parallel_world_size() if sp else L
