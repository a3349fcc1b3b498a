"""Mixture-of-experts MLPs (`model.moe`) through megatron-core's `MoELayer`: its router, its
all-to-all token dispatcher, its experts and shared expert, swapped into the layer spec.

Design choices:
- Every row of the sequence layout passes through the router, token by token: the V noisy
  views, the clean stream and the auxiliary AR stream alike ((V+1) L rows for about L targets).
  The load-balancing loss and the per-expert load count every routed row.
- The coefficient means the same in every layout. megatron-core scales the auxiliary (and z-)
  loss per routed row, assuming the rows that are routed are the rows the loss counts; under
  `calculate_per_token_loss` its gradient ends up multiplied by (rows routed) / (loss tokens),
  which here is V + 1 (+1 with the AR stream), and changes with the block-size schedule. The
  objective says, for each micro-batch, its loss tokens per routed row; `CascadeRouter`
  multiplies megatron-core's factor by it, so the loss is `NELBO per token + coeff x (the
  token-weighted mean over micro-batches of the micro-batch's balancing loss)` whatever the views,
  streams, block size or parallel layout (`tests/test_moe.py`). A forward without a scale
  (decoding, a distillation teacher) keeps megatron-core's scaling.
- The scale travels in arguments only, never on a module or in a process-wide context: in the
  micro-batch's layout (`AttentionLayout.routing_scale`, the forward's `attention_mask`, which
  megatron-core hands every layer), read by the layer (`SeededTransformerLayer`,
  `model/layers.py`), which calls its `CascadeMoELayer` with a `Routing`, which calls the
  router with it. megatron-core passes its MoE layer and router nothing but the rows, and its
  router attaches its losses inside `routing` from the logits alone: `CascadeRouter.forward`
  attaches them itself (megatron-core's formulas), with the `Routing` in hand.
- Initial expert weights do not depend on the expert-parallel layout: each expert's weights come
  from a generator seeded by (the layer's seed, the expert's global index); megatron-core would
  draw rank r's local experts from the stream rank 0 uses for its own (CPU initialisation; with
  Transformer Engine's grouped experts on a GPU, megatron-core's own GPU initialisation).
- Per-expert load and the balancing and z-losses (training forwards; the rerun of a recomputed
  layer, `Routing.count` false, not counted twice) are kept per router and read, all-reduced over
  the world, at each logged step (`step_metrics`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    compute_routing_scores_for_aux_loss,
    get_tokens_per_expert_and_token_count,
    switch_load_balancing_loss_func,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from cascade_mega.model.layers import Routing, SeededExperts
from cascade_mega.runtime import device


def transformer_kwargs(cfg, ffn_hidden_size: int) -> dict:
    """megatron-core's TransformerConfig fields for `model.moe` (none for a dense model)."""
    moe, p = cfg.model.moe, cfg.parallel
    if not moe.enabled:
        return {}
    from cascade_mega.runtime import te_support

    grouped = te_support.layers_used(cfg) if moe.grouped_gemm is None else moe.grouped_gemm
    balancing = moe.load_balancing if moe.aux_loss_coeff > 0 else "none"
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.ffn_hidden_size or ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_size or None,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_router_score_function=moe.score_function,
        # softmax over every expert, then the top k as they are (norm_topk_prob false); or the
        # top k logits, then a softmax over them (renormalised)
        moe_router_pre_softmax=moe.score_function == "softmax" and not moe.norm_topk_prob,
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff if balancing != "none" else 0.0,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=grouped,
        moe_router_dtype="fp32",
        moe_layer_freq=cfg.model.moe_pattern,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor or p.tensor,
    )


class CascadeMoELayer(MoELayer):
    """megatron-core's `MoELayer`, its steps in its order (megatron-core's `custom_forward` less
    partial CUDA graphs and layer recomputation), whose router gets the micro-batch's `Routing`
    (from `SeededTransformerLayer`, `model/layers.py`)."""

    def forward(self, hidden_states, padding_mask=None, routing: Routing = Routing()):
        if padding_mask is not None:
            raise ValueError("an MoE layer routes every row of the layout (model/moe.py): a "
                             "padding mask is not supported")
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE layers under tensor parallel need sequence parallel")
        shared_output = self.shared_experts_compute(hidden_states)
        probs, routing_map = self.router(hidden_states, routing)
        hidden_states, probs = self.preprocess(hidden_states, probs, routing_map)
        dispatched, probs = self.dispatch(hidden_states, probs)
        output, mlp_bias = self.routed_experts_compute(dispatched, probs)
        return self.postprocess(self.combine(output), shared_output), mlp_bias


class CascadeRouter(TopKRouter):
    """megatron-core's top-k router, with the balancing losses scaled per loss token (module
    docstring) and the per-expert load, the balancing loss and the z-loss kept for metrics.

    megatron-core's `routing` attaches its balancing and z-losses from the logits alone; here
    `forward`, which holds the micro-batch's `Routing`, attaches them (`apply_z_loss` and
    `is_aux_loss_enabled` keep megatron-core's own out) and counts them here, not in
    megatron-core's metrics tracker (a process-wide table sized by the first model it sees)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        dev = device.current()
        n = config.num_moe_experts
        self.register_buffer("load", torch.zeros(n, dtype=torch.float64, device=dev),
                             persistent=False)
        # [routed rows, assignments kept, balancing loss sum, its micro-batches, z-loss sum]
        self.register_buffer("tally", torch.zeros(5, dtype=torch.float64, device=dev),
                             persistent=False)

    def forward(self, input, routing: Routing = Routing()):
        """megatron-core's forward (gating, top-k, capacity, expert bias) with the z-loss and
        the balancing loss attached at `routing.scale`; a training forward with `routing.count`
        adds its load and losses to the metrics."""
        self._maintain_float32_expert_bias()
        logits = self.gating(self.apply_input_jitter(input))
        train = self.training and torch.is_grad_enabled()
        count = train and routing.count
        if train and self.config.moe_z_loss_coeff is not None:
            logits = self._z_loss(logits, routing.scale, count)
        probs, routing_map = self.routing(logits)
        if train and self.get_aux_loss_coeff(self.routing_type) > 0:
            probs = self._balancing_loss(probs, logits, routing.scale, count)
        if count:
            with torch.no_grad():
                kept = routing_map.sum(0)
                self.load += kept
                self.tally[0] += routing_map.shape[0]
                self.tally[1] += kept.sum()
        return probs, routing_map

    def apply_z_loss(self, logits, padding_mask=None):
        return logits  # attached by `forward`

    def is_aux_loss_enabled(self) -> bool:
        return False  # attached by `forward`

    def _z_loss(self, logits, scale, count):
        """The ST-MoE z-loss of the logits, averaged over the tensor x context group as
        megatron-core does (`TopKRouter.apply_z_loss`), attached to them."""
        coeff, group = self.config.moe_z_loss_coeff, self.tp_cp_group.size()
        flat = logits.view(-1, self.config.num_moe_experts)
        z = z_loss_func(flat, coeff / group)
        if count:
            with torch.no_grad():
                self.tally[4] += z.detach().double() * group / coeff * flat.shape[0]
        return MoEAuxLossAutoScaler.apply(logits, z * self._factor(flat.shape[0], scale))

    def _balancing_loss(self, probs, logits, scale, count):
        """megatron-core's Switch balancing loss over the micro-batch (`aux_loss`, its
        `TopKRouter._apply_aux_loss`) or per sequence (`seq_aux_loss`, `_apply_seq_aux_loss`),
        attached to the routing probabilities."""
        coeff, E = self.get_aux_loss_coeff(self.routing_type), self.config.num_moe_experts
        seq_len, bsz = logits.shape[:2]
        routing_map, scores = compute_routing_scores_for_aux_loss(
            logits.view(-1, E), self.topk, self.score_function,
            fused=self.config.moe_router_fusion)
        sequences = 1
        if self.routing_type == "seq_aux_loss":  # each sequence's experts as experts of their own
            sequences = bsz
            scores, routing_map = scores.reshape(seq_len, -1), routing_map.reshape(seq_len, -1)
        tokens_per_expert, rows, total = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_cp_group, topk=self.topk * sequences)
        aux = switch_load_balancing_loss_func(
            probs=scores, tokens_per_expert=tokens_per_expert, total_num_tokens=total,
            topk=self.topk, num_experts=E, moe_aux_loss_coeff=coeff,
            fused=self.config.moe_router_fusion) / sequences
        if count:
            with torch.no_grad():
                self.tally[2] += aux.detach().double() / coeff
                self.tally[3] += 1
        return MoEAuxLossAutoScaler.apply(probs, aux * self._factor(rows * sequences, scale))

    def _factor(self, rows, scale):
        """megatron-core's per-token-loss factor (routed rows x the tensor x context group, see
        its `attach_and_log_load_balancing_loss`) times the micro-batch's loss tokens per routed
        row (None: 1, megatron-core's own)."""
        if not self.calculate_per_token_loss:
            return 1.0
        return rows * self.tp_cp_group.size() * (1.0 if scale is None else scale)


def mlp_spec(cfg, te: bool):
    """The MoE MLP spec: megatron-core's `MoELayer` (as `CascadeMoELayer`) with the project's
    router (and seeded experts on the local spec)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    grouped = transformer_kwargs(cfg, 1)["moe_grouped_gemm"]
    spec = get_moe_module_spec(use_te=te, num_experts=cfg.model.moe.num_experts,
                               moe_grouped_gemm=grouped)
    submodules = spec.keywords["submodules"]
    experts = submodules.experts
    if not te:  # SequentialMLP: one MLP per local expert
        experts = functools.partial(SeededExperts, **experts.keywords)
    submodules = dataclasses.replace(submodules, router=CascadeRouter, experts=experts)
    return functools.partial(CascadeMoELayer, submodules=submodules)


def mark_experts(model) -> None:
    """Mark every expert weight as megatron-core marks them under expert parallel (`allreduce`
    false: reduced over the expert-data-parallel group, in the optimizer's expert group), also
    at EP = 1, where megatron-core leaves them dense. The expert-data-parallel group is then the
    data-parallel group, so nothing changes in a step; but the optimizer has the same parts (dense,
    experts) at every EP size, and an EP = 2 checkpoint loads at EP = 1 with its Adam state."""
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            p.allreduce = False


def routers(chunks):
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, CascadeRouter):
                yield module


def step_metrics(chunks, cfg) -> dict:
    """The expert load since the last call, over every rank (a collective on the world group):
    per expert its share of the routed assignments times the number of experts (1 = balanced)
    averaged over the MoE layers, the most and least loaded (layer, expert), the balancing loss
    and z-loss per micro-batch, and the assignments dropped over capacity. Resets the counts."""
    n_layers, E = cfg.model.num_layers, cfg.model.moe.num_experts
    dev = device.current()
    load = torch.zeros(n_layers, E, dtype=torch.float64, device=dev)
    tally = torch.zeros(n_layers, 5, dtype=torch.float64, device=dev)
    for router in routers(chunks):
        load[router.layer_number - 1] += router.load
        tally[router.layer_number - 1] += router.tally
        router.load.zero_()
        router.tally.zero_()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(load)
        torch.distributed.all_reduce(tally)
    p = cfg.parallel
    # without sequence parallel the tensor-parallel ranks route the same rows: count once
    copies = 1 if p.sequence_parallel else p.tensor
    load, tally = (load / copies).cpu(), (tally / copies).cpu()  # one read-back each
    moe_layers = [i for i, on in enumerate(cfg.model.moe_pattern) if on]
    load, tally = load[moe_layers], tally[moe_layers]
    if tally[:, 1].sum() == 0:
        return {}
    share = load / load.sum(1, keepdim=True).clamp(min=1) * E  # [layers, E], 1 = balanced
    out = {f"expert_load/{e}": float(share[:, e].mean()) for e in range(E)}
    out["moe/load_max"], out["moe/load_min"] = float(share.max()), float(share.min())
    rows, kept = tally[:, 0].sum(), tally[:, 1].sum()
    out["moe/dropped"] = float(1 - kept / (rows * cfg.model.moe.top_k)) if rows else 0.0
    if tally[:, 3].sum() > 0:  # a micro-batch's balancing loss is its sum over tensor x context
        out["moe/aux_loss"] = float(tally[:, 2].sum() * p.tensor * p.context / tally[:, 3].sum())
    if cfg.model.moe.z_loss_coeff:
        out["moe/z_loss"] = float(tally[:, 4].sum() / rows)
    return out

