"""The rules between config sections (layout arithmetic, continued pretraining), after each
section has checked itself. One message naming the keys involved, before anything is built."""

from __future__ import annotations

from dataclasses import fields

from cascade_mega.config.objectives import layout_of
from cascade_mega.config.sections import CascadeConfig, Section, need


def validate(cfg: CascadeConfig, world_size: int = 1) -> None:
    """Reject impossible combinations with one message naming the keys involved: each section
    checks itself, then the rules between sections. Once per config object and world size
    (`load_config` checks; the trainer's call is then a no-op)."""
    if getattr(cfg, "_checked_for", None) == world_size:
        return
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        if isinstance(section, Section):
            section.check()
    _check_model_layout(cfg)
    _check_experts(cfg)
    _check_continued(cfg)  # what a feature needs comes before the world-size arithmetic
    _check_parallel_layout(cfg, world_size)
    cfg._checked_for = world_size  # not a field: a copy (`replace`) is checked again


def _check_model_layout(cfg: CascadeConfig) -> None:
    """The model and its sequence against the parallel layout."""
    m, d, p, t = cfg.model, cfg.diffusion, cfg.parallel, cfg.train
    L, layout = cfg.data.seq_len, layout_of(cfg)  # the objective's answer (config/objectives.py)
    need(L % layout.block == 0, f"'diffusion.block_size' = {layout.block} does not divide "
         f"'data.seq_len' = {L}")
    need(not m.time_conditioning or d.objective == "block_diffusion",
         f"'model.time_conditioning' embeds the noise level of a block; 'diffusion.objective' = "
         f"{d.objective} has no noise (use block_diffusion)")
    search = d.schedule_search
    ranges = [(d.t_min, d.t_max)] + [tuple(c) for c in search.candidates if search.interval]
    clipped = next((r for r in ranges if tuple(r) != (0.0, 1.0)), None)
    need(not m.time_conditioning or clipped is None,
         f"'model.time_conditioning' embeds the noise level of a block, but training draws it "
         f"in {list(clipped or ())} ('diffusion.t_min' / 't_max' or a range "
         "'diffusion.schedule_search' may choose), while validation reads levels over "
         "(t_floor, 1] and decoding the masked share of a block down to 1 / block size, levels "
         "the embedding never learnt: train a time-conditioned model over [0, 1]")
    need(not search.interval or search.criterion == "draws" or p.pipeline == p.context == 1,
         "'diffusion.schedule_search.criterion' = blocks reads each block's loss off the "
         "model's output on one rank: it needs 'parallel.pipeline' = 1 and 'parallel.context' "
         "= 1 (criterion draws runs at any layout)")
    need(not (p.tp_comm_overlap and cfg.distill.teacher),
         "'parallel.tp_comm_overlap' sizes Transformer Engine's userbuffers for one row count; "
         "'distill.teacher' adds rows in training that evaluation does not have")
    need(d.clean_stream == "block_causal" or d.block_size < cfg.data.seq_len,
         f"'diffusion.clean_stream' = {d.clean_stream}: at 'diffusion.block_size' = "
         f"'data.seq_len' = {cfg.data.seq_len} (full diffusion) there is no clean stream")
    need(d.ar_loss_weight == 0 or p.context == 1,
         "'diffusion.ar_loss_weight' has no context-parallel path: use 'parallel.context' = 1")
    need(m.num_attention_heads % p.tensor == 0,
         f"'parallel.tensor' = {p.tensor} does not divide 'model.num_attention_heads' = "
         f"{m.num_attention_heads}")
    need(m.groups % p.tensor == 0,
         f"'parallel.tensor' = {p.tensor} does not divide 'model.num_query_groups' = {m.groups}")
    need(m.vocab_size is None or m.vocab_size % p.tensor == 0,
         f"'parallel.tensor' = {p.tensor} does not divide 'model.vocab_size' = {m.vocab_size}")
    need(m.num_layers % p.pipeline == 0,
         f"'parallel.pipeline' = {p.pipeline} does not divide 'model.num_layers' = {m.num_layers}")
    bf16_layers = t.fp8_bf16_first_layers, t.fp8_bf16_last_layers
    need(min(bf16_layers) >= 0 and max(bf16_layers) <= m.num_layers // p.pipeline,
         f"'train.fp8_bf16_first_layers' / 'train.fp8_bf16_last_layers' = {bf16_layers} must be "
         f"between 0 and the layers of a pipeline stage ({m.num_layers // p.pipeline})")
    need(0 <= cfg.optimizer.warmup_steps < t.steps, f"'optimizer.warmup_steps' = "
         f"{cfg.optimizer.warmup_steps} must be smaller than 'train.steps' = {t.steps}")
    if p.context > 1:
        B = 1 if layout.kind == "full" else layout.block  # full diffusion gathers whole views
        need(L % (2 * p.context * B) == 0,
             f"'parallel.context' = {p.context} cuts 'data.seq_len' = {L} into 2 x {p.context} "
             + (f"chunks: seq_len must be a multiple of 2 x context = {2 * p.context}"
                if B == 1 else "chunks of whole blocks: seq_len must be a multiple of 2 x "
                f"context x block size = {2 * p.context * B}"))
        need(m.attention_kernel in ("auto", "tiled"), f"'parallel.context' > 1 runs the tiled "
             f"attention kernel; 'model.attention_kernel' = {m.attention_kernel} has no "
             "context-parallel path")
    if p.sequence_parallel:
        rows = layout.rows // p.context
        need(rows % p.tensor == 0, f"'parallel.sequence_parallel' splits this rank's {rows} "
             f"sequence rows across 'parallel.tensor' = {p.tensor} ranks: they must divide evenly")


def _check_experts(cfg: CascadeConfig) -> None:
    """`model.moe` and expert parallel against the model and the layout (megatron-core's own
    conditions, said in the config's words before anything is built)."""
    moe, m, p = cfg.model.moe, cfg.model, cfg.parallel
    if not moe.enabled:
        need(p.expert == 1 and p.expert_tensor in (None, 1), "'parallel.expert' / "
             "'parallel.expert_tensor' split experts: they need 'model.moe.num_experts'")
        return
    need(moe.num_experts % p.expert == 0, f"'parallel.expert' = {p.expert} does not divide "
         f"'model.moe.num_experts' = {moe.num_experts}")
    etp = p.expert_tensor or p.tensor
    ffn = moe.ffn_hidden_size or m.ffn_hidden_size
    need(ffn is None or ffn % etp == 0, f"'parallel.expert_tensor' = {etp} does not divide the "
         f"expert FFN size {ffn}")
    need(moe.shared_expert_size % p.tensor == 0, f"'parallel.tensor' = {p.tensor} does not "
         f"divide 'model.moe.shared_expert_size' = {moe.shared_expert_size}")
    need(p.expert * etp == 1 or p.tensor == 1 or p.sequence_parallel,
         "expert parallel with 'parallel.tensor' > 1 needs 'parallel.sequence_parallel' = true "
         "(megatron-core's token dispatcher)")
    need(moe.pattern is None or len(moe.pattern) == m.num_layers,
         f"'model.moe.pattern' has {len(moe.pattern or [])} entries for 'model.num_layers' = "
         f"{m.num_layers}")
    need(any(m.moe_pattern), "'model.moe' leaves no layer with experts ('model.moe.pattern' / "
         "'model.moe.first_dense_layers')")
    need(not moe.expert_bias or moe.score_function == "sigmoid",
         "'model.moe.expert_bias' (aux-loss-free balancing) needs 'model.moe.score_function' = "
         "sigmoid")
    need(moe.score_function == "softmax" or moe.norm_topk_prob,
         "'model.moe.score_function' = sigmoid always renormalises the top-k scores: set "
         "'model.moe.norm_topk_prob' = true")
    need(not (moe.top_k == 1 and moe.norm_topk_prob and moe.score_function == "softmax"),
         "'model.moe.top_k' = 1 with 'model.moe.norm_topk_prob' gives every token weight 1 "
         "(the router would learn nothing): set 'model.moe.norm_topk_prob' = false")


def _check_parallel_layout(cfg: CascadeConfig, world_size: int) -> None:
    """The layout against the number of processes and the batch."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size == 0:  # e.g. reading a finished sweep back: whatever world it ran at
        world_size = model_parallel * t.global_batch_size // t.micro_batch_size
    need(world_size % model_parallel == 0,
         f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x "
         f"parallel.context = {model_parallel}")
    dp = world_size // model_parallel
    if cfg.model.moe.enabled:
        expert_tp = (p.expert_tensor or p.tensor) * p.expert
        need(world_size // p.pipeline % expert_tp == 0,
             f"the expert layout does not tile the world: expert_tensor x expert x expert-data "
             f"x pipeline = {world_size} needs 'parallel.expert_tensor' x 'parallel.expert' = "
             f"{expert_tp} to divide world size / 'parallel.pipeline' = "
             f"{world_size // p.pipeline}")
    need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
         f"'train.global_batch_size' = {t.global_batch_size} is not a multiple of "
         f"'train.micro_batch_size' x data-parallel size = {t.micro_batch_size} x {dp}")


def _check_continued(cfg: CascadeConfig) -> None:
    """The block-size schedule and distillation against the rest of the run."""
    d, p, L = cfg.diffusion, cfg.parallel, cfg.data.seq_len
    schedule = d.block_size_schedule
    if schedule:
        steps = sorted(schedule)
        need(list(schedule) == steps, f"'diffusion.block_size_schedule' lists its steps "
             f"{list(schedule)} out of order: give them increasing (a phase per start step)")
        need(steps[0] == 0, f"'diffusion.block_size_schedule' must start at step 0, got "
             f"{steps[0]}")
        need(steps[-1] < cfg.train.steps, f"'diffusion.block_size_schedule' starts block size "
             f"{schedule[steps[-1]]} at step {steps[-1]}, not before 'train.steps' = "
             f"{cfg.train.steps}")
        need(schedule[steps[-1]] == d.block_size, f"'diffusion.block_size_schedule' ends at "
             f"block size {schedule[steps[-1]]}; it must end at 'diffusion.block_size' = "
             f"{d.block_size} (the block size the model is decoded with)")
        need(1 not in schedule.values() or d.shifted_prediction,
             "'diffusion.block_size_schedule' block size 1 is an AR phase: it needs "
             "'diffusion.shifted_prediction' = true (row i-1 predicts token i, as in AR)")
        need(1 not in schedule.values() or not cfg.distill.teacher,
             "'diffusion.block_size_schedule' block size 1 (an AR phase) cannot be distilled "
             "from 'distill.teacher' (the teacher is that AR model's kind already)")
        for step, B in schedule.items():
            need(B > 0 and L % B == 0, f"'diffusion.block_size_schedule' block size {B} (from "
                 f"step {step}) does not divide 'data.seq_len' = {L}")
            need(p.context == 1 or B == L or L % (2 * p.context * B) == 0,
                 f"'diffusion.block_size_schedule' block size {B} does not fit the "
                 f"context-parallel chunks (seq_len a multiple of 2 x context x B)")
    if cfg.distill.teacher:
        need(d.objective == "block_diffusion", "'distill.teacher' distils an AR teacher into a "
             "block-diffusion model: 'diffusion.objective' must be block_diffusion")
        need(not (p.sequence_parallel and p.pipeline > 1) or L % p.tensor == 0,
             f"'distill.teacher' under pipeline and sequence parallel splits the teacher's {L} "
             f"rows across 'parallel.tensor' = {p.tensor} ranks: they must divide evenly")
        need(p.context == 1, "'distill.teacher' has no context-parallel path (a target's teacher "
             "row can sit on another rank): use 'parallel.context' = 1")
        need(not p.virtual_pipeline, "'distill.teacher' has no interleaved-pipeline path: unset "
             "'parallel.virtual_pipeline'")
