"""Layer pieces the project swaps into megatron-core's local spec.

- `SeededTransformerLayer`: reseeds the CPU generator from (seed, global layer number) before
  building its weights, so initial weights do not depend on the pipeline layout (megatron draws
  them from one stream in build order, which differs per stage). With `use_cpu_initialization`
  megatron already makes them independent of the tensor-parallel size.
- `RMSNorm`: torch's RMSNorm that marks its weight for megatron's sequence-parallel gradient
  all-reduce (megatron's torch-norm wrapper refuses sequence parallel).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)


def layer_seed(seed: int, layer_number: int) -> int:
    return (seed * 1_000_003 + layer_number * 7919) % (2**63 - 1)


class SeededTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int = 0,
                 **kwargs):
        # megatron passes the stage-local number and adds the stage offset itself
        offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"))
        torch.manual_seed(layer_seed(init_seed, layer_number + offset))
        super().__init__(config, submodules, layer_number, *args, **kwargs)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
