"""Process-group set-up from torchrun or Slurm environment variables (`env.py`), and seeding.

gloo on CPU, NCCL on GPU; the process's device (`device.py`) is decided here first.
"""

from __future__ import annotations

import atexit
import os
import random
import socket
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from cascade_mega.runtime import cpu_compat, cpu_memory, device
from cascade_mega.runtime.env import DistEnv, read_env  # noqa: F401  (re-exported)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(parallel, seed: int) -> DistEnv:
    """Initialise torch.distributed and megatron-core's parallel state; seed every generator.
    The world group waits `parallel.startup_timeout_minutes` (rank 0 builds the dataset and its
    sample index while the others wait in it); megatron-core's groups, which carry every
    training collective, `parallel.timeout_minutes`."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    env = read_env()
    dev = device.select(env.local_rank)  # a GPU job's rank without a GPU stops here
    if cpu_compat.apply():
        cpu_memory.keep_freed_memory()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "RANK" not in os.environ and env.world_size == 1:
            # a bare single process: no launcher owns a store, so take any free port (an
            # inherited MASTER_PORT may belong to a parent process's group)
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            rank=env.rank, world_size=env.world_size,
            timeout=timedelta(minutes=parallel.startup_timeout_minutes))
        _shutdown_at_exit()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            context_parallel_size=parallel.context,
            expert_model_parallel_size=parallel.expert,
            expert_tensor_parallel_size=parallel.expert_tensor,
            distributed_timeout_minutes=parallel.timeout_minutes,
        )
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    return env


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_AT_EXIT = False
_FAILED = False


def _shutdown_at_exit() -> None:
    """Destroy the groups `init` created when the process ends (`atexit`), once per process.

    At exit, not at the end of a command: the process that initialised torch.distributed is the
    one to end it, whatever started it (the `cascade` console script, `python -m cascade_mega`
    as torchrun starts each rank, tools/gpu_check.py), while the tests call the command line's
    `main` many times in one pytest process and rely on the groups (the `megatron` fixture's)
    living across those calls. NCCL warns about, and may leak, a process group left for the
    interpreter's teardown to destroy."""
    global _AT_EXIT
    if not _AT_EXIT:
        _AT_EXIT = True
        atexit.register(_shutdown_unless_failed)


def ended_on_error() -> None:
    """This process's command failed (`cli.main`'s error exits): leave the groups at exit."""
    global _FAILED
    _FAILED = True


def _shutdown_unless_failed() -> None:
    # A process ending on an error (an uncaught exception, or a command's error exit) leaves the
    # groups to the interpreter's teardown, as before: its peers may not have ended with it, and
    # NCCL's destroy_process_group flushes (waits for) collectives they may never complete,
    # where the rank should exit and let torchrun stop the others.
    if not _FAILED and getattr(sys, "last_value", None) is None:
        shutdown()


def shutdown() -> None:
    """Destroy megatron-core's parallel state and the default process group (every group with
    it). Safe to call twice, and when nothing was initialised. `init` arranges it at exit."""
    if not dist.is_available():
        return
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # imported by `init`
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
