"""Layer pieces the project swaps into megatron-core's local spec.

- `SeededTransformerLayer`: reseeds the CPU generator from (seed, global layer number) before
  building its weights, so initial weights do not depend on the pipeline layout (megatron draws
  them from one stream in build order, which differs per stage). With `use_cpu_initialization`
  megatron already makes them independent of the tensor-parallel size. `model.recompute=full`
  keeps only each layer's input and recomputes the layer in backward (through Transformer
  Engine's checkpoint under FP8, which replays the forward's FP8 scaling state).
- `RMSNorm`: torch's RMSNorm that marks its weight for megatron's sequence-parallel gradient
  all-reduce (megatron's torch-norm wrapper refuses sequence parallel).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from torch.utils.checkpoint import checkpoint

from cascade_mega.runtime import device


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

                return te_checkpoint(super().forward, False, get_cuda_rng_tracker,
                                     parallel_state.get_tensor_model_parallel_group(),
                                     *args, use_reentrant=False, **kwargs)
            # torch's non-reentrant checkpoint, since megatron's own saves its arguments as
            # tensors and the attention layout is not one
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, device=device.current())
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
