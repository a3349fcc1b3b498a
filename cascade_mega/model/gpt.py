"""The model: megatron-core GPTModel, Llama-style, with the project's core attention.

Design choices:
- Llama architecture (RMSNorm, SwiGLU, RoPE, optional GQA and QKV bias, tied or untied embeddings)
  so Llama / Qwen2 weights map one to one.
- RoPE follows `position_ids` (megatron's default RoPE uses 0..S-1), so both halves of the
  block-diffusion layout `[x_t ; x_0]` get the same positions, a decoded block gets its offset,
  and a context-parallel rank's chunks get theirs.
- The output layer runs only on the rows that carry a prediction (`ReadOut.rows`): the clean half of
  the 2L layout never reaches the vocabulary projection, and the loss is computed per token there.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from cascade_mega.config import CascadeConfig, ConfigError
from cascade_mega.model.attention import BlockDiffusionAttention
from cascade_mega.model import moe
from cascade_mega.model.layers import RMSNorm, SeededTransformerLayer
from cascade_mega.runtime import compilation, device, te_support


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def vocab_rows(cfg, vocab_size: int, tp: int | None = None) -> int:
    """The one padded-vocabulary rule: the embedding's rows for a tokenizer of `vocab_size`
    ids, `model.vocab_size` when set, else padded to a multiple of
    `model.make_vocab_size_divisible_by` x the tensor-parallel size (default: the config's)."""
    m = cfg.model
    if m.vocab_size and m.vocab_size < vocab_size:
        raise ConfigError(f"'model.vocab_size' = {m.vocab_size} is smaller than the tokenizer's "
                          f"{vocab_size} ids (null: the tokenizer's, padded)")
    return m.vocab_size or padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by,
                                             tp or cfg.parallel.tensor)


def ffn_size(cfg: CascadeConfig) -> int:
    m = cfg.model
    return m.ffn_hidden_size or int(math.ceil(8 * m.hidden_size / 3 / 64) * 64)


def fusions(cfg: CascadeConfig) -> dict:
    """megatron-core's fused kernels that `model.fusions` (None: on a GPU) turns on where they
    exist: bias-SwiGLU (megatron-core's `jit_fuser`, torch.compile) and the weight-gradient
    accumulation into the fp32 main gradients, which needs apex's CUDA extension: the output
    layer is megatron-core's own linear layer even under the TE spec, and refuses the flag
    without it. RoPE fusion stays off: TE's fused RoPE takes one position row for the batch,
    and batched decoding gives each sequence its own."""
    import importlib.util

    on = device.on_gpu() if cfg.model.fusions is None else cfg.model.fusions
    apex = device.on_gpu() and bool(importlib.util.find_spec("fused_weight_gradient_mlp_cuda"))
    return {"bias_activation_fusion": on, "apply_rope_fusion": False,
            "gradient_accumulation_fusion": on and apex}


def transformer_config(cfg: CascadeConfig, dtype: torch.dtype) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    on_gpu = device.on_gpu()
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        ffn_hidden_size=ffn_size(cfg),
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_norm,
        kv_channels=m.kv_channels,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        # on every device: each weight is drawn whole on the host from the layer's seed
        # (`model/layers.py`), split for this rank and moved to the device. A seed then gives the
        # same initial weights on CPU and GPU at any TP / PP / EP (megatron's device path draws
        # each tensor-parallel shard from its own CUDA stream), at the cost of host time at
        # start-up (the whole of each weight, once per rank)
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        sequence_parallel=p.sequence_parallel,
        calculate_per_token_loss=True,
        **fusions(cfg),
        bias_dropout_fusion=False,  # no dropout; the attention and the loss are the project's own
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        tp_comm_overlap=p.tp_comm_overlap,
        # gloo matches a batch's sends and receives by peer and tag only: with interleaved stages
        # a rank exchanges activations and gradients of the same shape with one peer, and batched
        # ops can pair the wrong ones. Ordered single ops on CPU; batched (NCCL) on GPU.
        batch_p2p_comm=on_gpu,
        # FP8 through Transformer Engine (validated in config: TE + GPU). The TE linear layers run
        # in FP8; the block-diffusion core attention is plain torch and stays in BF16.
        fp8=cfg.train.fp8,
        fp8_recipe=cfg.train.fp8_recipe,
        fp8_margin=cfg.train.fp8_margin,
        fp8_amax_history_len=cfg.train.fp8_amax_history_len,
        fp8_amax_compute_algo=cfg.train.fp8_amax_compute_algo,
        first_last_layers_bf16=bool(cfg.train.fp8_bf16_first_layers or
                                    cfg.train.fp8_bf16_last_layers),
        num_layers_at_start_in_bf16=cfg.train.fp8_bf16_first_layers,
        num_layers_at_end_in_bf16=cfg.train.fp8_bf16_last_layers,
        **moe.transformer_kwargs(cfg, ffn_size(cfg)),
    )


def layer_spec(cfg: CascadeConfig, vp_stage=None):
    """megatron-core's spec for this stage's layers, with the project's core attention, seeded
    layers and (local spec) sequence-parallel-aware norms; with `model.moe`, megatron-core's
    `MoELayer` as the MLP of the layers the pattern names (`model/moe.py`)."""
    te = te_support.layers_used(cfg)
    qk = cfg.model.qk_norm
    spec = copy.deepcopy(te_support.layer_spec(qk_layernorm=qk) if te else
                         get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk))
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        BlockDiffusionAttention, kernel=cfg.model.attention_kernel)
    spec.module = SeededTransformerLayer
    spec.params = {**spec.params, "init_seed": cfg.train.seed,
                   "recompute": cfg.model.recompute == "full"}
    if not te:
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        if qk:  # per head; megatron-core sums their gradients over the tensor-parallel ranks
            attention = spec.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = RMSNorm
    if not cfg.model.moe.enabled:
        if te:
            return spec
        final_norm = RMSNorm
        specs = [spec] * cfg.model.num_layers
    else:
        sparse = copy.deepcopy(spec)
        sparse.submodules.mlp = moe.mlp_spec(cfg, te)
        if te:  # the dense spec fuses the MLP's norm into its first linear layer; experts do not
            from megatron.core.extensions.transformer_engine import TENorm

            sparse.submodules.pre_mlp_layernorm = TENorm
        final_norm = TENorm if te else RMSNorm
        specs = [sparse if on else spec for on in cfg.model.moe_pattern]
    tconf = transformer_config(cfg, torch.float32)
    offset = get_transformer_layer_offset(tconf, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset:offset + get_num_layers_to_build(tconf, vp_stage=vp_stage)],
        layer_norm=final_norm)


class CascadeGPTModel(GPTModel):
    """GPTModel whose RoPE follows position_ids. Time-conditioned (`noise_levels` [b, S],
    `model/noise_level.py`), its first stage adds each row's noise-level embedding to the word
    embeddings and hands the sum to megatron-core as the decoder input: the levels travel in the
    forward's arguments, nothing of a call is kept on the model."""

    def forward(self, input_ids, position_ids, attention_mask, *args, noise_levels=None,
                **kwargs):
        embed = getattr(self, "noise_embedding", None)  # first stage, time-conditioned only
        if embed is not None and not args and kwargs.get("decoder_input") is None:
            if noise_levels is None:
                raise ValueError("a time-conditioned model (model.time_conditioning) needs the "
                                 "noise level of every row (noise_levels)")
            hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)
            if self.config.sequence_parallel:  # this rank's rows only (its grads are partial:
                n = hidden.shape[0]  # summed over the ranks, `model/noise_level.py`)
                start = parallel_state.get_tensor_model_parallel_rank() * n
                noise_levels = noise_levels[:, start:start + n]
            kwargs["decoder_input"] = hidden + embed(noise_levels).to(hidden.dtype)
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = list(super()._preprocess(input_ids, position_ids, *args, **kwargs))
        if self.position_embedding_type == "rope" and position_ids is not None:
            # get_emb: the table before megatron's own context-parallel slicing (our position ids
            # are already this rank's). The table covers the model's context, so its length is
            # known on the host: reading max(position_ids) back would stall the device each step.
            freqs = self.rotary_pos_emb.get_emb(self.max_sequence_length)  # [S, 1, 1, D]
            # position_ids [1, S] (training: shared by the batch) gives [S, 1, 1, D], broadcast
            # over the batch; [b, S] (batched decoding, a position axis per sequence) [S, b, 1, D]
            out[1] = freqs[position_ids.t()].squeeze(2)
        return tuple(out)


def _vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over a vocabulary split across the tensor-parallel group. logits: [n, b, v/tp]."""
    value, index = logits.max(dim=-1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return index
    group = parallel_state.get_tensor_model_parallel_group()
    index = index + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    values = [torch.empty_like(value) for _ in range(tp)]
    indices = [torch.empty_like(index) for _ in range(tp)]
    torch.distributed.all_gather(values, value.contiguous(), group=group)
    torch.distributed.all_gather(indices, index.contiguous(), group=group)
    best = torch.stack(values).argmax(dim=0, keepdim=True)
    return torch.stack(indices).gather(0, best).squeeze(0)


class _VocabParallelKL(torch.autograd.Function):
    """KL(teacher || student) per row over a vocabulary split across the tensor-parallel group.

    Ids a model never predicts carry -inf in both (same `logit_bias`); they add nothing. The
    gradient with respect to the student's logits is softmax(student) - softmax(teacher), kept
    from the forward (one [n, b, v/tp] tensor, like the cross-entropy's)."""

    @staticmethod
    def forward(ctx, student, teacher):
        group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()

        def log_softmax(x):
            top = x.max(dim=-1, keepdim=True).values
            if tp > 1:
                torch.distributed.all_reduce(top, torch.distributed.ReduceOp.MAX, group=group)
            shifted = x - top
            total = shifted.exp().sum(dim=-1, keepdim=True)
            if tp > 1:
                torch.distributed.all_reduce(total, group=group)
            return shifted - total.log()

        log_s, log_t = log_softmax(student), log_softmax(teacher)
        p_t = log_t.exp()
        kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(dim=-1)
        if tp > 1:
            torch.distributed.all_reduce(kl, group=group)
        ctx.save_for_backward(log_s.exp_().sub_(p_t))
        return kl

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * diff, None


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) per row; [n, b, v/tp] fp32 logits -> [n, b]."""
    return _VocabParallelKL.apply(student, teacher)


def read_out_logits(hidden_states, output_layer, output_weight, rows, gather: bool):
    """The output layer on the chosen rows only. Under sequence parallel each rank holds a slice
    of the sequence: gather it first (backward: each rank keeps its slice of the gradient, after
    the output layer's own all-reduce), then run the layer without its sequence gather."""
    sp = output_layer.sequence_parallel
    if sp:
        hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=False)
    if rows is not None:
        hidden_states = hidden_states.index_select(0, rows)
    output_layer.sequence_parallel = False
    try:
        logits, _ = output_layer(hidden_states, weight=output_weight,
                                 runtime_gather_output=gather or None)
    finally:
        output_layer.sequence_parallel = sp
    return logits


def allowed_logits(hidden_states, output_layer, output_weight, rows, gather: bool):
    """fp32 logits of the read-out rows with the ids the model never predicts ([MASK], vocabulary
    padding) at -inf. In place on the linear layer's own output (it keeps no copy); a gathered
    output can be a view autograd forbids changing, so that one is copied."""
    logits = read_out_logits(hidden_states, output_layer, output_weight, rows, gather).float()
    bias = output_layer.logit_bias
    return logits + bias if gather else logits.add_(bias)


def logits_at_rows(*, hidden_states, output_layer, output_weight, context, **_unused):
    """megatron `output_processor`: `allowed_logits` [n, b, v/tp] of the rows in `context`."""
    return allowed_logits(hidden_states, output_layer, output_weight, context, False)


def predict_and_score(*, hidden_states, output_layer, output_weight, context, **_unused):
    """megatron `output_processor`: logits on the read-out rows only, per-token CE and hits.

    Returns (ce [b, n] fp32, correct [b, n] bool), and kl [b, m] when the context carries a
    teacher's logits for the first m targets. A context with `score_entropy` set
    (`model/scores.py`) gets g(Z / a) added to the CE of its first `score_cols` targets.
    """
    logits = allowed_logits(hidden_states, output_layer, output_weight, context.rows, False)
    labels = context.labels.t().contiguous()  # [n, b]
    extra = None
    if getattr(context, "score_entropy", False):
        from cascade_mega.model import scores

        cols = context.score_cols if context.score_cols is not None else logits.shape[0]
        extra = scores.excess(scores.vocab_parallel_logsumexp(logits[:cols]),
                              scores.offset(output_layer))
    # before the cross-entropy, which turns the logits into probabilities in place
    kl = None if context.teacher is None else \
        vocab_parallel_kl(logits[:context.teacher.shape[0]], context.teacher)
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    if extra is not None:
        ce = torch.cat([ce[:extra.shape[0]] + extra, ce[extra.shape[0]:]])
    with torch.no_grad():
        correct = _vocab_parallel_argmax(logits) == labels
    if kl is None:
        return ce.t(), correct.t()
    return ce.t(), correct.t(), kl.t()


@contextlib.contextmanager
def without_fp8(model):
    """Run the block inside without FP8: decoding forwards have row counts that Transformer
    Engine's FP8 GEMMs refuse (multiples of 8 / 16), and need no FP8 speed. megatron decides at
    each forward from the config, which every layer of the model shares."""
    config = getattr(model, "config", None)
    saved = getattr(config, "fp8", None)
    if saved:
        config.fp8 = None
    try:
        yield model
    finally:
        if saved:
            config.fp8 = saved


def build_model(cfg: CascadeConfig, vocab_size: int, forbidden_ids=(), *, pre_process=True,
                post_process=True, dtype=torch.float32, vp_stage=None) -> CascadeGPTModel:
    """One model chunk for this rank. `forbidden_ids` (e.g. [MASK]) can never be predicted."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = vocab_rows(cfg, vocab_size, tp)
    compilation.configure()  # its compiled callables: a deliberate limit, no silent fallback
    model = CascadeGPTModel(
        config=transformer_config(cfg, dtype),
        transformer_layer_spec=layer_spec(cfg, vp_stage),
        vocab_size=padded,
        max_sequence_length=cfg.data.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rotary_base),
        rope_scaling=cfg.model.rope_scaling == "llama3",
        rope_scaling_factor=cfg.model.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    if cfg.model.moe.enabled:
        moe.mark_experts(model)
    if cfg.model.time_conditioning and pre_process:
        from cascade_mega.model.noise_level import NoiseLevelEmbedding

        model.noise_embedding = NoiseLevelEmbedding(cfg.model.hidden_size, cfg.model.init_std,
                                                    cfg.train.seed, dtype)
    if post_process:
        per_rank = padded // tp
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        dev = device.current()
        vocab_ids = torch.arange(start, start + per_rank, device=dev)
        forbidden = torch.tensor(list(forbidden_ids), dtype=torch.long, device=dev)
        banned = (vocab_ids >= vocab_size) | torch.isin(vocab_ids, forbidden)
        bias = torch.zeros(per_rank, device=dev).masked_fill(banned, float("-inf"))
        model.output_layer.register_buffer("logit_bias", bias, persistent=False)
    # megatron builds its layers on the host (`use_cpu_initialization`, above): the whole model
    # moves to the process's device here, once
    return model.to(device.current())


def build_chunks(cfg: CascadeConfig, tokenizer, dtype=torch.float32) -> list:
    """The one model builder (trainer, distillation teacher, decoding, conversion): this rank's
    model chunks, one per virtual pipeline stage (one without), for `tokenizer` (its vocabulary
    padded by `vocab_rows`, its [MASK] never predicted)."""
    vp = cfg.parallel.virtual_pipeline
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        chunks.append(build_model(
            cfg, tokenizer.vocab_size, forbidden_ids=[tokenizer.mask_id],
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            dtype=dtype, vp_stage=vp_stage))
    return chunks


def parameter_counts(chunks) -> tuple[int, int]:
    """(total, without embeddings) of the whole model, not this rank's shard: each tensor-parallel
    shard counts once, a replicated tensor (a norm) on tensor rank 0 only, the output layer's copy
    of a tied embedding not at all; experts likewise over the expert-tensor x expert ranks.
    Summed over the model-parallel and the expert groups (collectives)."""
    ps = parallel_state
    ranks = {False: ps.get_tensor_model_parallel_rank(),
             True: ps.get_expert_tensor_parallel_rank()}
    # added up on the host on purpose (numel is host data), moved to the device once below
    counts = torch.zeros(2, 2, dtype=torch.float64)  # [dense, expert] x [total, body]
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if getattr(p, "shared_embedding", False) and "output_layer" in name:
                continue
            expert = not getattr(p, "allreduce", True)  # megatron-core's mark of an expert
            if not getattr(p, "tensor_model_parallel", False) and ranks[expert]:
                continue
            body = "word_embeddings" not in name and "output_layer" not in name
            counts[int(expert)] += torch.tensor([p.numel(), p.numel() * body])
    counts = counts.to(device.current())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts[0], group=ps.get_model_parallel_group())
        torch.distributed.all_reduce(
            counts[1], group=ps.get_expert_tensor_model_pipeline_parallel_group())
    total, body = counts.sum(0).cpu().tolist()  # one copy to the host
    return int(total), int(body)
