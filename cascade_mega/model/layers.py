"""Layer pieces the project swaps into megatron-core's local spec.

- `SeededTransformerLayer`: reseeds the CPU generator from (seed, global layer number) before
  building its weights, so initial weights do not depend on the pipeline layout (megatron draws
  them from one stream in build order, which differs per stage). Weights are drawn on the host
  on every device (`use_cpu_initialization`, `model/gpt.py`), whole and then split, so they do
  not depend on the device or the tensor-parallel size either. `model.recompute=full`
  keeps only each layer's input and recomputes the layer in backward (through Transformer
  Engine's checkpoint under FP8, which replays the forward's FP8 scaling state).
- `SeededExperts`: megatron-core's `SequentialMLP` whose expert e draws its initial weights from
  (the layer's seed, e), whichever expert-parallel rank holds it (megatron-core would draw rank
  r's local experts from the stream rank 0 uses for its own).
- `routing_scale`: the loss tokens per routed row of the micro-batch in flight, which an MoE
  layer's router reads (`moe.py`) and a recomputed layer restores.
- `RMSNorm`: torch's RMSNorm in the model's dtype that marks its weight for megatron's
  sequence-parallel gradient all-reduce (megatron's torch-norm wrapper refuses sequence parallel).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Optional

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank
from torch.utils.checkpoint import checkpoint

from cascade_mega.runtime import device


# (loss tokens per routed row of the micro-batch in flight, whether its load is counted)
_ROUTING: contextvars.ContextVar = contextvars.ContextVar("cascade_routing", default=(None, True))


@contextlib.contextmanager
def routing_scale(scale: Optional[float], count: bool = True):
    """The forward inside routes a micro-batch with `scale` loss tokens per routed row;
    count=False: its expert load is not counted again (a recomputation)."""
    token = _ROUTING.set((scale, count))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def current_routing():
    return _ROUTING.get()


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

                return te_checkpoint(self._rerun_routed(), False, get_cuda_rng_tracker,
                                     parallel_state.get_tensor_model_parallel_group(),
                                     *args, use_reentrant=False, **kwargs)
            # torch's non-reentrant checkpoint, since megatron's own saves its arguments as
            # tensors and the attention layout is not one
            return checkpoint(self._rerun_routed(), *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)

    def _rerun_routed(self):
        """The layer's forward, rerun in backward under the micro-batch's routing scale (an MoE
        layer's balancing loss, `model/moe.py`), without counting its expert load again."""
        scale, count = current_routing()
        calls = []

        def run(*args, **kwargs):
            with routing_scale(scale, count and not calls):
                calls.append(1)
                return TransformerLayer.forward(self, *args, **kwargs)
        return run


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
