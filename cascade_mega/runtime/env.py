"""Rank and world size from the launcher's environment (torchrun, Slurm), without importing torch.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; under `srun` without torchrun we read
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (with MASTER_ADDR set by the job script); a bare run is
a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def read_env() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)
