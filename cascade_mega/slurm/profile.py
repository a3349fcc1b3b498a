"""Cluster profiles: what a cluster offers and how jobs run on it (`configs/clusters/NAME.yaml`).

Typed like the run config: an unknown key or a wrong type is one error naming it. `cascade submit
--cluster NAME` finds `configs/clusters/NAME.yaml` (or takes a path).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade_mega.config import ConfigError
from cascade_mega.runtime.provenance import ROOT

PROFILES = os.path.join(ROOT, "configs", "clusters")


@dataclass
class ClusterProfile:
    name: str = "cluster"
    partition: str = "batch"
    partitions: List[str] = field(default_factory=list)  # the cluster's (checked with sinfo too)
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1  # default of --nodes
    max_nodes: Optional[int] = None
    gpus_per_node: int = 0  # used per node; 0: CPU nodes
    max_gpus_per_node: int = 0  # what a node has
    gpu_memory_gb: float = 0.0  # per GPU, for `cascade sweep`'s memory check (0: not checked)
    cpus_per_node: int = 1
    tasks_per_node: Optional[int] = None  # None: one per GPU (or 1 on CPU nodes)
    time_limit: str = "04:00:00"
    signal_lead_s: int = 300  # USR1 this long before the time limit: time to checkpoint
    max_restarts: int = 20
    container_image: Optional[str] = None  # pyxis / enroot (srun --container-image)
    container_mounts: List[str] = field(default_factory=list)
    modules: List[str] = field(default_factory=list)  # `module load` before the job step
    env: Dict[str, str] = field(default_factory=dict)  # exported in the job (NCCL, CUDA, ...)
    sbatch_extra: List[str] = field(default_factory=list)  # more #SBATCH lines, verbatim
    python: Optional[str] = None  # on the nodes (in the image, if any); None: the submitting one
    # the batch shell's interpreter, outside any container: runs the requeue decision (stdlib
    # only), so a requeue never waits for the image to be imported again; None: `python` without
    # a container, else python3
    host_python: Optional[str] = None
    device_tflops: float = 989.0  # dense bf16 peak per device, for the time-limit check
    assumed_mfu: float = 0.4  # expected fraction of it
    startup_s: int = 120  # job start to first step (imports, data, model, resume)
    checkpoint_write_gbps: float = 2.0  # what the job's ranks write together to the run dir
    kill_wait_s: int = 30  # Slurm's KillWait: SIGTERM to SIGKILL (0: not checked)


def profile_path(name: str) -> str:
    if os.path.isfile(name):
        return name
    path = os.path.join(PROFILES, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(PROFILES) if f.endswith(".yaml"))
        raise ConfigError(f"unknown cluster profile {name!r}: expected one of "
                          f"{', '.join(known)} (configs/clusters/) or a YAML path")
    return path


def load_profile(name: str) -> ClusterProfile:
    path = profile_path(name)
    try:
        node = OmegaConf.merge(OmegaConf.structured(ClusterProfile), OmegaConf.load(path))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"cluster profile {path}: bad key '{key}': "
                          f"{str(err).splitlines()[0]}") from None
    return OmegaConf.to_object(node)


def seconds(limit: str) -> int:
    """Slurm time limit ([D-]HH:MM:SS, MM:SS or minutes) in seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})", limit)
    if m:
        d, h, mi, s = (int(x or 0) for x in m.groups())
        return ((d * 24 + h) * 60 + mi) * 60 + s
    m = re.fullmatch(r"(\d+):(\d{2})", limit)
    if m:
        return int(m.group(1)) * 60 + int(m.group(2))
    if limit.isdigit():
        return int(limit) * 60
    raise ConfigError(f"time limit {limit!r}: expected [D-]HH:MM:SS, MM:SS or minutes")
