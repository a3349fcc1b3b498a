"""Loading a checkpoint executes nothing.

Checkpoints are shared and downloaded, and a pickle runs whatever its author wrote. torch's
distributed checkpoint (what megatron-core's `dist_checkpointing` reads through) unpickles two
things with no restriction: the `.metadata` file (`pickle.load`) and every non-tensor item of
a shard file, megatron's common state and each sharded object (`torch.load(weights_only=False)`
in `DefaultLoadPlanner.load_bytes`). `install` narrows both, process-wide, before any load:

- `.metadata` goes through an unpickler that resolves only the classes a DCP metadata file is
  made of (the dataclasses and enums of `torch.distributed.checkpoint.metadata` / `.planner`,
  `_StorageInfo`, `torch.Size`, dtypes, layouts), by name, never a function that acts;
- a shard's non-tensor items load with `torch.load(weights_only=True)`: tensors, numbers,
  strings and plain containers, which is all this project and megatron-core save there.

Anything else stops the load with `UnsafeCheckpoint`, naming the file (or item) and the global it
asked for, before the object is built. Tensor items were already loaded with weights_only=True.
"""

from __future__ import annotations

import io
import pickle

import torch


refusals: list = []  # this process's refusals, newest last: torch wraps the error it raises in
# its own (per rank, with fallbacks tried), so the loader names the refusal from here


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file asks to run or build something a checkpoint never holds."""

    def __init__(self, message: str):
        super().__init__(message)
        refusals.append(message)


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_NAMED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
          ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _NAMED:
        return True
    if module == "torch":  # dtypes, layouts, memory formats: values, nothing callable
        value = getattr(torch, name, None)
        return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
    if module in _DCP_MODULES:  # their dataclasses and enums only, not their functions
        import importlib

        value = getattr(importlib.import_module(module), name, None)
        return isinstance(value, type) and not name.startswith("__")
    return False


class MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str = "the checkpoint's .metadata"):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if _allowed(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{self.source} asks to load {module}.{name}, which a checkpoint "
                               "never holds: refusing to unpickle it")


class _SafePickleModule:
    """Stands in for the `pickle` module inside torch's filesystem reader: loads restricted,
    dumps unchanged."""

    dump, dumps, HIGHEST_PROTOCOL = pickle.dump, pickle.dumps, pickle.HIGHEST_PROTOCOL

    @staticmethod
    def load(file, **_):
        return MetadataUnpickler(file, getattr(file, "name", "the checkpoint's .metadata")).load()

    @staticmethod
    def loads(data, **_):
        return MetadataUnpickler(io.BytesIO(data)).load()


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """`DefaultLoadPlanner.load_bytes` with weights_only=True."""
    from torch.distributed.checkpoint._traverse import set_element

    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as err:
        text, marker = str(err), "Unsupported global: GLOBAL "
        wanted = text.split(marker)[1].split()[0] if marker in text else "an object"
        raise UnsafeCheckpoint(f"checkpoint item '{read_item.dest_index.fqn}' asks to load "
                               f"{wanted}, which a checkpoint never holds: refusing to unpickle "
                               "it") from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def install() -> None:
    """Idempotent; process-wide (every later load of any checkpoint goes through it)."""
    from torch.distributed.checkpoint import default_planner, filesystem

    filesystem.pickle = _SafePickleModule
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes
