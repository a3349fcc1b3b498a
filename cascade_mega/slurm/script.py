"""sbatch scripts from the templates in `slurm/`: `{{name}}` placeholders, every one filled.

The training template starts one task per GPU (one per node on CPU profiles) with `srun`; each
task reads its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the rendezvous from
MASTER_ADDR / MASTER_PORT (`runtime/env.py`), as Megatron jobs usually do. (torchrun's elastic
agent would sit between Slurm's signals and the ranks, which must see them to checkpoint.)
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import List, Optional

from cascade_mega.slurm.profile import ROOT, ClusterProfile

TEMPLATES = os.path.join(ROOT, "slurm")


@dataclass
class Resources:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time: str
    partition: str


def fill(template: str, values: dict) -> str:
    text = open(os.path.join(TEMPLATES, template)).read()
    missing = set(re.findall(r"{{(\w+)}}", text)) - set(values)
    if missing:
        raise KeyError(f"{template}: no value for {', '.join(sorted(missing))}")
    return re.sub(r"{{(\w+)}}", lambda m: str(values[m.group(1)]), text)


def _sbatch_lines(profile: ClusterProfile, res: Resources, extra: List[str]) -> str:
    lines = []
    if res.gpus_per_node:
        lines.append(f"--gpus-per-node={res.gpus_per_node}")
    if profile.account:
        lines.append(f"--account={profile.account}")
    if profile.qos:
        lines.append(f"--qos={profile.qos}")
    lines += list(profile.sbatch_extra) + extra
    return "\n".join(f"#SBATCH {line}" for line in lines)


def _setup_lines(profile: ClusterProfile, code: str) -> str:
    lines = [f"module load {m}" for m in profile.modules]
    if code != ROOT:  # code frozen at submission comes first; the working directory not at all
        q = shlex.quote(code)
        lines += [f"export CASCADE_CODE={q}  # cascade submit --code package (snapshot.py)",
                  f"export PYTHONPATH={q}${{PYTHONPATH:+:$PYTHONPATH}}",
                  "export PYTHONSAFEPATH=1"]
    if profile.gpus_per_node:  # a rank that sees no GPU stops instead of training on the CPU
        lines.append("export CASCADE_EXPECT_GPU=1")
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in profile.env.items()]
    return "\n".join(lines)


def _srun_options(profile: ClusterProfile) -> str:
    opts = []
    if profile.container_image:
        opts.append(f"--container-image={shlex.quote(profile.container_image)}")
        if profile.container_mounts:
            opts.append("--container-mounts=" + shlex.quote(",".join(profile.container_mounts)))
        opts.append("--container-workdir=" + shlex.quote(os.getcwd()))
    return " ".join(opts)


def python_of(profile: ClusterProfile) -> str:
    return profile.python or sys.executable


def host_python(profile: ClusterProfile) -> str:
    """The batch shell's interpreter (outside the container): the requeue decision needs only
    the standard library, and must not re-import the image inside the warning window."""
    if profile.host_python:
        return profile.host_python
    return "python3" if profile.container_image else python_of(profile)


def _in_batch_shell(profile: ClusterProfile, code: str, module: str) -> str:
    """`python -m MODULE` of `code`'s copy, run by the batch shell's interpreter."""
    return f"cd {shlex.quote(code)} && {host_python(profile)} -m {module}"


def train_script(profile: ClusterProfile, res: Resources, configs: List[str],
                 run_dirs: List[str], log_dir: str, job_name: str, max_restarts: int,
                 array_parallel: Optional[int] = None, code: str = ROOT) -> str:
    """One training run, or a job array over `configs` (task i: configs[i], run_dirs[i]), running
    the code in `code` (the checkout, or a copy frozen at submission)."""
    extra = []
    if len(configs) > 1:
        extra.append(f"--array=0-{len(configs) - 1}" +
                     (f"%{array_parallel}" if array_parallel else ""))
        select = (f"CONFIGS=({' '.join(shlex.quote(c) for c in configs)})\n"
                  f"RUN_DIRS=({' '.join(shlex.quote(d) for d in run_dirs)})\n"
                  'export CONFIG=${CONFIGS[$SLURM_ARRAY_TASK_ID]}\n'
                  'export RUN_DIR=${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}')
    else:
        select = (f"export CONFIG={shlex.quote(configs[0])}\n"
                  f"export RUN_DIR={shlex.quote(run_dirs[0])}")
    cpus = max(1, profile.cpus_per_node // res.tasks_per_node)
    python = python_of(profile)
    return fill("train.sbatch", {
        "profile": profile.name, "job_name": job_name, "partition": res.partition,
        "nodes": res.nodes, "tasks_per_node": res.tasks_per_node, "cpus_per_task": cpus,
        "time": res.time, "log_dir": log_dir,
        "log_name": "%x-%A_%a" if len(configs) > 1 else "%x-%j",
        "signal_lead": profile.signal_lead_s, "workdir": os.getcwd(),
        "sbatch_lines": _sbatch_lines(profile, res, extra),
        "setup_lines": _setup_lines(profile, code),
        "task_select": select, "srun_options": _srun_options(profile),
        "launch": f'{python} -m cascade_mega train "$CONFIG"',
        "requeue": _in_batch_shell(profile, code, "cascade_mega.slurm.requeue"),
        "heartbeat": _in_batch_shell(profile, code, "cascade_mega.runtime.heartbeat"),
        "max_restarts": max_restarts,
    })


def stage_script(profile: ClusterProfile, res: Resources, args: List[str], log_dir: str,
                 job_name: str, code: str = ROOT) -> str:
    """A one-task job running `cascade ARGS` (the non-training stages of a chain)."""
    return fill("stage.sbatch", {
        "profile": profile.name, "job_name": job_name, "partition": res.partition,
        "cpus_per_task": profile.cpus_per_node, "time": res.time, "log_dir": log_dir,
        "workdir": os.getcwd(), "sbatch_lines": _sbatch_lines(profile, res, []),
        "setup_lines": _setup_lines(profile, code),
        "srun_options": _srun_options(profile),
        "command": f"{python_of(profile)} -m cascade_mega {shlex.join(args)}",
    })
