"""Peak memory of a piece of work: on the CPU by tracking every tensor storage torch allocates.

torch has no allocator statistics on the CPU, so a dispatch mode sees each op's outputs, counts a
storage when it first appears and uncounts it when it is freed (a weakref finalizer). Tensors that
existed before (parameters, optimizer state) are not counted: the figure is the peak of what the
measured work allocates (activations, gradients held for backward, temporaries).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live = {}

    def _free(self, key, nbytes):
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's memory is a view (a weight's transpose): nothing new
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self._live or (storage.nbytes() and storage.data_ptr() in inputs):
                    continue
                nbytes = storage.nbytes()
                self._live[key] = True
                weakref.finalize(storage, self._free, key, nbytes)
                self.current += nbytes
                self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn) -> int:
    """Peak bytes allocated while running fn(): the CUDA allocator's own peak above what was
    allocated before (on a GPU), or the storages a dispatch mode sees appear (on the CPU)."""
    from cascade_mega.runtime import device

    if device.on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakMemory() as mode:
        fn()
    return mode.peak
