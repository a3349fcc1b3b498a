"""Entry point for one training run: trainer plus the standard callbacks."""

from __future__ import annotations

import os

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

        return torchrun.launch(config, overrides, nproc_per_node, nnodes, rdzv_endpoint)
    if os.environ.get("CASCADE_CHILD"):  # a rank of our launcher: it ends with its torchrun
        from cascade_launchers import torchrun

        torchrun.die_with_parent()
    train(cfg)
    return 0
