"""What a tracked run records about itself: the resolved config, the code and the machine.

Parameters are immutable in MLflow, so everything that can change when a run is resumed (the
layout after a resharding resume, the Slurm job of a requeue) goes into tags instead.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from omegaconf import OmegaConf

from cascade_mega.runtime import provenance


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_params(cfg) -> dict:
    from cascade_mega.config import redact_uri

    flat = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return {k: redact_uri(v) if isinstance(v, str) else v for k, v in flat.items()}


def code_version() -> dict:
    """The git commit of the code that runs (a job's frozen copy records its own), and whether
    it differs from that commit (`runtime/provenance.py`)."""
    rec = provenance.record()
    return {"code.git_commit": rec["commit"], "code.git_dirty": rec["dirty"]} \
        if rec.get("commit") else {}


def versions() -> dict:
    out = {"version.python": platform.python_version()}
    for dist, key in (("torch", "torch"), ("megatron-core", "megatron_core"),
                      ("transformer-engine", "transformer_engine"), ("mlflow", "mlflow"),
                      ("nvidia-dali-cuda120", "dali"), ("cascade-mega", "cascade_mega")):
        try:
            out[f"version.{key}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if key == "transformer_engine":
                out[f"version.{key}"] = "not installed"
    return out


def layout_tags(trainer) -> dict:
    """The parallel layout and where the job runs (tags: they may change on resume)."""
    tags = {f"layout.{k}": v for k, v in trainer.layout().items()}
    tags["host"] = platform.node()
    for env, key in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_ARRAY_JOB_ID", "slurm.array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm.array_task_id"),
                     ("SLURM_RESTART_COUNT", "slurm.restart_count"),
                     ("SLURM_JOB_NUM_NODES", "slurm.nodes")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    return {k: str(v) for k, v in tags.items()}
