"""Layer pieces the project swaps into megatron-core's local spec.

- `SeededTransformerLayer`: reseeds the CPU generator from (seed, global layer number) before
  building its weights, so initial weights do not depend on the pipeline layout (megatron draws
  them from one stream in build order, which differs per stage). Weights are drawn on the host
  on every device (`use_cpu_initialization`, `model/gpt.py`), whole and then split, so they do
  not depend on the device or the tensor-parallel size either. `model.recompute=full`
  keeps only each layer's input and recomputes the layer in backward (through Transformer
  Engine's checkpoint under FP8, which replays the forward's FP8 scaling state).
- `Routing`: how an MoE layer's router treats the micro-batch in flight (`moe.py`): its loss
  tokens per routed row, and whether its expert load is counted. It travels in arguments only,
  never on a module or in a process-wide context: the scale rides in the micro-batch's layout
  (`AttentionLayout.routing_scale`, set by `objective.prepare`), the one per-forward argument
  (`attention_mask`) megatron-core's block hands every layer unchanged; an MoE layer of
  `SeededTransformerLayer` reads it there and calls its MLP (`moe.CascadeMoELayer`) with the
  `Routing`, which hands it to the router. `count` is false for the rerun of a recomputed layer
  in backward, which routes the same rows again.
- `SeededExperts`: megatron-core's `SequentialMLP` whose expert e draws its initial weights from
  (the layer's seed, e), whichever expert-parallel rank holds it (megatron-core would draw rank
  r's local experts from the stream rank 0 uses for its own).
- `RMSNorm`: torch's RMSNorm in the model's dtype that marks its weight for megatron's
  sequence-parallel gradient all-reduce (megatron's torch-norm wrapper refuses sequence parallel).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank
from torch.utils.checkpoint import checkpoint

from cascade_mega.runtime import device


class Routing(NamedTuple):
    """How an MoE layer routes one micro-batch (`moe.py`)."""

    scale: Optional[float] = None  # loss tokens per routed row; None: megatron-core's scaling
    count: bool = True  # count its expert load and losses (false: a recomputation's rerun)


def layer_seed(seed: int, layer_number: int) -> int:
    return (seed * 1_000_003 + layer_number * 7919) % (2**63 - 1)


class SeededTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int = 0,
                 recompute: bool = False, **kwargs):
        # megatron passes the stage-local number and adds the stage offset itself
        offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"))
        torch.manual_seed(layer_seed(init_seed, layer_number + offset))
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.recompute = recompute

    def forward(self, *args, **kwargs):
        if self.recompute and torch.is_grad_enabled():
            # keep only the layer's input; rerun the layer in backward. Layers hold no dropout,
            # so the recomputation is exact.
            if self.config.fp8:
                # under FP8 the rerun must see the forward's scaling state: TE's checkpoint
                # keeps it (torch's would recompute with advanced amax history)
                from megatron.core import parallel_state
                from megatron.core.extensions.transformer_engine import te_checkpoint
                from megatron.core.tensor_parallel import get_cuda_rng_tracker

                return te_checkpoint(self._counted_once(), False, get_cuda_rng_tracker,
                                     parallel_state.get_tensor_model_parallel_group(),
                                     *args, use_reentrant=False, **kwargs)
            # torch's non-reentrant checkpoint, since megatron's own saves its arguments as
            # tensors and the attention layout is not one
            return checkpoint(self._counted_once(), *args, use_reentrant=False, **kwargs)
        return self._layer(*args, **kwargs)

    def _counted_once(self):
        """The layer's forward for a checkpoint: the first run (the forward) counts an MoE
        layer's expert load, the rerun in backward does not count it again."""
        runs = []

        def run(*args, **kwargs):
            runs.append(1)
            return self._layer(*args, count=len(runs) == 1, **kwargs)
        return run

    def _layer(self, *args, count: bool = True, **kwargs):
        """megatron-core's layer forward. An MoE layer calls its MLP itself, with the
        micro-batch's `Routing` (megatron-core's `_forward_mlp` passes its MLP nothing but the
        rows), on the path the project's layers take: no MLP recomputation, chunking,
        packed-sequence reshaping or CUDA graphs."""
        if not self.is_moe_layer:
            return TransformerLayer.forward(self, *args, **kwargs)
        hidden_states, context = self._forward_attention(*args, **kwargs)
        layout = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        routing = Routing(getattr(layout, "routing_scale", None), count)
        output = self.mlp(self._forward_pre_mlp_layernorm(hidden_states),
                          padding_mask=kwargs.get("padding_mask"), routing=routing)
        return self._forward_post_mlp(output, hidden_states), context


class SeededExperts(SequentialMLP):
    """megatron-core's `SequentialMLP` whose expert e draws its initial weights from a generator
    seeded by (the layer's seed, e), whichever rank holds it."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        layer = torch.initial_seed()  # the layer's seed (`SeededTransformerLayer`)
        first = get_pg_rank(pg_collection.ep) * num_local_experts
        experts = iter(range(first, first + num_local_experts))
        fc1 = submodules.linear_fc1

        def seeded_fc1(*args, **kwargs):
            torch.manual_seed(layer_seed(layer, 1 + next(experts)))
            return fc1(*args, **kwargs)

        super().__init__(num_local_experts, config,
                         dataclasses.replace(submodules, linear_fc1=seeded_fc1),
                         pg_collection=pg_collection, name=name)
        # what follows (the shared expert) draws the same on every expert layout
        torch.manual_seed(layer_seed(layer, 1 + config.num_moe_experts))


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        # in the model's dtype: megatron-core's mixed-precision optimizer keeps fp32 main copies of
        # the params_dtype parameters, and its checkpoint maps only those
        super().__init__(hidden_size, eps=eps, device=device.current(),
                         dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
