"""Process-group set-up from torchrun or Slurm environment variables, and seeding.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under `srun` without
torchrun we read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; a bare `python` run is a world of one.
gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from cascade_mega.runtime import cpu_compat, cpu_memory


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)


def init(parallel, seed: int) -> DistEnv:
    """Initialise torch.distributed and megatron-core's parallel state; seed every generator."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if cpu_compat.apply():
        cpu_memory.keep_freed_memory()
    env = read_env()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "RANK" not in os.environ and env.world_size == 1:
            # a bare single process: no launcher owns a store, so take any free port (an
            # inherited MASTER_PORT may belong to a parent process's group)
            os.environ["MASTER_PORT"] = str(_free_port())
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=10))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            context_parallel_size=parallel.context,
        )
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    return env


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
