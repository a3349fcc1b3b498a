"""The one device of a process: where the model, its batches and every tensor that meets them live.

It is decided once at start-up (`select`, called by `distributed.init`): the local rank's CUDA
device on a GPU host, the CPU otherwise. Everything that creates a tensor the model will see asks
`current()` (training, evaluation, distillation, decoding, conversion loaders, benches), so nothing
lands on the host by default on a GPU host. Host-side work (data reading, noise draws from seeded
CPU generators, the layout bookkeeping of `objective.prepare`) stays on the host on purpose, since
its results must not depend on the device, and crosses once per micro-batch through `to_device`:
pinned memory and a non-blocking copy on CUDA, so the host never waits for it (the copy is queued
on the compute stream, ahead of the kernels that read it).

`use(device)` sets it explicitly: the device tests put a stand-in device here that is not the host,
so any tensor created on the host by mistake meets a device tensor and fails
(`tests/standin_device.py`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from cascade_mega.errors import UserError

_DEVICE: Optional[torch.device] = None


class DeviceError(UserError, RuntimeError):
    """A rank cannot use the device its job asked for (a GPU job on a rank that sees none)."""


# set by the job script of a cluster profile with GPUs: such a rank must not train on the CPU
EXPECT_GPU = "CASCADE_EXPECT_GPU"


def select(local_rank: int = 0) -> torch.device:
    """Decide this process's device at start-up: `cuda:<local_rank>` where CUDA is present, the
    CPU otherwise; a rank of a GPU job (`CASCADE_EXPECT_GPU=1`) that sees no CUDA device stops
    with one message instead of training on the CPU over gloo."""
    global _DEVICE
    if _DEVICE is not None:
        return _DEVICE
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DeviceError(f"local rank {local_rank} has no CUDA device: this node shows "
                              f"{count} (CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        torch.cuda.set_device(local_rank)
        _DEVICE = torch.device("cuda", local_rank)
    elif os.environ.get(EXPECT_GPU) == "1":
        raise DeviceError(
            f"this rank (host {os.uname().nodename}, local rank {local_rank}) sees no CUDA "
            f"device, but its job runs on a GPU cluster profile (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): check the allocation's GPUs, "
            "the container's GPU access and that torch is a CUDA build")
    else:
        _DEVICE = torch.device("cpu")
    return _DEVICE


def use(device: Optional[torch.device]) -> None:
    """Set the device explicitly (None: decide again at the next `select`)."""
    global _DEVICE
    _DEVICE = None if device is None else torch.device(device)


def current() -> torch.device:
    """The process's device (decided on first use if start-up has not done it yet)."""
    return _DEVICE if _DEVICE is not None else select(int(os.environ.get("LOCAL_RANK", 0)))


def on_gpu() -> bool:
    return current().type == "cuda"


def synchronize() -> None:
    """Wait for the device's queued work (benchmarks' timers; a no-op on the CPU)."""
    if on_gpu():
        torch.cuda.synchronize()


def to_device(x, device: Optional[torch.device] = None):
    """A host tensor (or a dataclass / tuple / list / dict of them) on the device: pinned and
    non-blocking on CUDA, so the copy runs while the previous micro-batch computes."""
    device = device or current()
    if isinstance(x, torch.Tensor):
        if x.device == device:
            return x
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(device, non_blocking=device.type != "cpu")
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: to_device(getattr(x, f.name), device)
                                         for f in dataclasses.fields(x) if f.init})
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x
