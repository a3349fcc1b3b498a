"""The launcher `cascade train CONFIG --nproc-per-node N` uses: torchrun, run for the user.

It starts N ranks of `cascade train` on this node (`--nnodes` > 1: one such call per node,
meeting at `--rdzv-endpoint`); each rank reads its place from torchrun's environment
(`cascade_mega/runtime/env.py`). The parent validated the config before calling this, so a bad
config never starts a rank. Ranks started by another launcher (Slurm's `srun`, a torchrun line
of one's own) need nothing from here.

Stdlib only: it runs before the ranks import torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (`prctl(PR_SET_PDEATHSIG)`): torchrun
    when `cascade train` is killed outright, a rank when torchrun is. A kill -9 then leaves no rank
    training on, holding the run directory and its GPU, under PID 1 (saves are atomic: the last
    complete checkpoint stays). Elsewhere (not Linux): nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def command(config: str, overrides, nproc_per_node: int, nnodes: int = 1,
            rdzv_endpoint: str = "127.0.0.1:29500") -> list:
    """The torchrun command line that starts this node's ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--nnodes={nnodes}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    return cmd + ["-m", "cascade_mega", "train", config, *overrides]


def launch(config: str, overrides, nproc_per_node: int, nnodes: int = 1,
           rdzv_endpoint: str = "127.0.0.1:29500") -> int:
    """Run the ranks to the end; returns torchrun's exit status. Each rank gets an equal share of
    this node's cores (OMP_NUM_THREADS) unless the caller set it."""
    env = {**os.environ, "CASCADE_CHILD": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    return subprocess.call(command(config, overrides, nproc_per_node, nnodes, rdzv_endpoint),
                           env=env, preexec_fn=die_with_parent)
