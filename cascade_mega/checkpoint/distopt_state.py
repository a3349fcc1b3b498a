"""The distributed optimizer's checkpoint state at its parameters' own offsets.

megatron-core 0.19.2 saves the distributed optimizer in the `fully_reshardable` format by
gathering each gradient buffer's state into one world tensor per key
(`DistributedOptimizer.get_parameter_state_dp_zero`), which drops the padding at the end of every
bucket, and then slices that tensor at each parameter's offsets in the *padded* buffer
(`buffer.param_index_map`). With one bucket the two agree; from the second bucket on every
parameter's main weights and Adam moments are read from the wrong place, so a resume is not the
uninterrupted run. Several buckets are the rule wherever the gradient reduce overlaps with
compute (the GPU default; `parallel.bucket_size`). Here the world tensors are laid out at the
padded buffer's offsets before they are sliced, on save and on load alike (the load builds its
templates the same way), so every parameter reads its own state. Checkpoints with one bucket
are unchanged.
"""

from __future__ import annotations

import functools

import torch


def install() -> None:
    """Patch megatron-core's distributed optimizer once (idempotent)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer, "_cascade_padded_state", False):
        return
    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    @functools.wraps(original)
    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        gather = self.get_parameter_state_dp_zero

        def padded(*a, **k):
            return _at_padded_offsets(self, gather(*a, **k))

        self.get_parameter_state_dp_zero = padded
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    DistributedOptimizer.sharded_param_state_fully_reshardable = \
        sharded_param_state_fully_reshardable
    DistributedOptimizer._cascade_padded_state = True


def _at_padded_offsets(optimizer, state):
    """Each bucket's part of every world tensor moved to the bucket's offset in its buffer."""
    if state is None:
        return None
    for gbuf_idx, buffer in enumerate(optimizer.buffers):
        for world in state[gbuf_idx].values():
            for key, flat in list(world.items()):
                if not isinstance(flat, torch.Tensor):
                    continue
                # host tensors, as megatron gathers them
                out = torch.zeros(buffer.numel, dtype=flat.dtype, device=flat.device)
                start = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    out[bucket.offset:bucket.offset + n] = flat[start:start + n]
                    start += n
                world[key] = out
    return state
