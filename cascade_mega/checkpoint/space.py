"""Disk space for a save: checked before anything is written, and named when the disk still fills.

A checkpoint takes about the bytes of the state it holds: each rank's main-replica shards (a
tensor replicated over data-parallel ranks is written once), summed over the ranks, plus the
common state. Before a save writes anything, every rank learns (one all-reduce) whether the
filesystem of the checkpoint folder has that much free, with a margin for metadata and the
manifest (`MARGIN`); too little stops the run with one message naming the checkpoint, the path
and the free space, the previous checkpoint untouched.

Another writer can still fill the disk during the save. The save's `.partial` folder is then
removed, which gives its space back (so the run's closing writes, its metrics and spooled
artifacts, still fit), and the same kind of message replaces the writer's own errors (torch's
`Worker failure` / `unexpected pos`, which never say "disk full").
"""

from __future__ import annotations

import errno
import os
import shutil

import torch
import torch.distributed as dist

from cascade_mega.errors import RunStopped

MARGIN = (1.05, 1 << 20)  # needed = 1.05 x the state's bytes + 1 MiB


class OutOfSpace(RunStopped):
    """The disk of the checkpoint folder cannot hold the save (the run stops; exit 1)."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def state_bytes(state, rank0: bool) -> int:
    """This rank's share of a sharded state dict's bytes on disk: main-replica shards, and on rank
    0 the common tensors (the rest of the common state is a few numbers)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (ShardedTensor, ShardedTensorFactory,
                                                          is_main_replica)

    total = 0
    for value in nested_values(state):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            if is_main_replica(value.replica_id) and isinstance(value.data, torch.Tensor):
                total += value.data.numel() * value.data.element_size()
        elif rank0 and isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def free_bytes(folder: str) -> int:
    """Free space for an unprivileged writer on the filesystem that holds `folder` (or the
    nearest existing folder above it)."""
    while not os.path.exists(folder):
        folder = os.path.dirname(folder) or "."
    return shutil.disk_usage(folder).free


def needed(state_size: int) -> int:
    return int(MARGIN[0] * state_size) + MARGIN[1]


def check(ckpt_root: str, name: str, state, last: str = None) -> tuple:
    """Collective. (bytes the save needs, bytes free); OutOfSpace (on every rank alike) when rank
    0 sees less free in `ckpt_root`'s filesystem. `last`: the newest complete checkpoint, named
    in the message."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    size = state_bytes(state, rank0)
    free = free_bytes(ckpt_root) if rank0 else 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        from cascade_mega.runtime import device

        both = torch.tensor([size, free], dtype=torch.int64, device=device.current())
        dist.all_reduce(both)  # the sizes add up; only rank 0 contributed the free space
        size, free = (int(v) for v in both.tolist())
    need = needed(size)
    if need > free:
        raise OutOfSpace(message(name, ckpt_root, free, need, last, before=True))
    return need, free


def message(name: str, ckpt_root: str, free: int, need: int, last: str = None,
            before: bool = False) -> str:
    when = "not enough space to save" if before else "out of space while saving"
    kept = f"the last complete checkpoint, {os.path.basename(last)}, is intact" if last else \
        "no checkpoint of this run is complete yet"
    return (f"{when} checkpoint {name} in {os.path.abspath(ckpt_root)} (free: {_gib(free)}; it "
            f"needs about {_gib(need)}); the run stops and {kept}: free some space (or lower "
            "'checkpoint.keep_last') and resume with the same command")


def is_full(err: BaseException, ckpt_root: str) -> bool:
    """Whether a save's failure was the disk filling: ENOSPC / EDQUOT anywhere in the error's
    chain, or (torch's checkpoint writer reports the workers' failures without their cause) no
    more than the margin left free while the save's folder is still there."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return free_bytes(ckpt_root) < MARGIN[1]
