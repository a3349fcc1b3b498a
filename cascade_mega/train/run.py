"""Entry point for one training run: trainer plus the standard callbacks."""

from __future__ import annotations

import os
import shutil
import sys

from cascade_mega.train.callbacks import standard
from cascade_mega.train.trainer import Trainer


def train(cfg):
    trainer = Trainer(cfg, standard(cfg)).setup()
    trainer.fit()
    return trainer


def command(config: str, overrides, nproc_per_node: int = 0, nnodes: int = 1,
            rdzv_endpoint: str = "127.0.0.1:29500") -> int:
    """`cascade train`: check the config (and the tracking store) once, then train in this
    process, or start this node's ranks with the torchrun launcher (`launchers/torchrun.py`)."""
    from cascade_mega.config import ConfigError, load_config
    from cascade_mega.runtime.env import read_env

    if nproc_per_node < 0 or nnodes < 1:
        raise ConfigError(f"--nproc-per-node must be >= 0 and --nnodes >= 1, got "
                          f"{nproc_per_node} and {nnodes}")
    spawn = nproc_per_node and "RANK" not in os.environ
    world = nproc_per_node * nnodes if spawn else None
    cfg = load_config(config, overrides, world_size=world)  # fails before any rank starts
    if read_env().rank == 0 and not os.environ.get("CASCADE_CHILD"):
        from cascade_mega.tracking.store import preflight

        preflight(cfg)  # a malformed tracking URI or a refused experiment stops here
        print(f"run_dir: {os.path.abspath(cfg.run_dir)}", flush=True)
    if spawn:
        from cascade_launchers import torchrun

        code, received, killed = torchrun.launch(config, overrides, nproc_per_node, nnodes,
                                                 rdzv_endpoint, cfg.train.stop_grace_s)
        return after_ranks(cfg.run_dir, code, received, killed)
    if os.environ.get("CASCADE_CHILD"):  # a rank of our launcher: it ends with its torchrun
        from cascade_launchers import torchrun

        torchrun.die_with_parent()
    train(cfg)
    return 0


def after_ranks(run_dir: str, code: int, received, killed: bool) -> int:
    """What the launcher settles once its ranks have ended, however they ended: `exit.json` in a
    terminal state (a rank 0 killed before it wrote one left 'running': 'killed' when the
    launcher killed it or a signal did, else 'failed'), and no LOCK or `.partial` checkpoint
    of a trainer that is gone. Returns the exit status."""
    from cascade_mega.train.callbacks.exit_record import settle
    from cascade_mega.train.run_lock import clear_dead

    outcome = settle(run_dir, "killed" if killed or code < 0 or code > 128 else "failed",
                     received)
    if clear_dead(run_dir):  # rank 0 was of this node and is gone: nobody finishes its save
        folder = os.path.join(run_dir, "checkpoints")
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    if killed:
        print(f"cascade: the ranks did not stop within 'train.stop_grace_s' and were killed; "
              f"the last complete checkpoint stays (exit.json: {outcome})", file=sys.stderr,
              flush=True)
    return 128 + (-code) if code < 0 else code
