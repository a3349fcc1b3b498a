"""`cascade submit`: a training run, a job array, or a chain of stages, to Slurm.

    cascade submit CONFIG [KEY=VALUE ...] --cluster PROFILE [--nodes N] [--dry-run]
    cascade submit CONFIG_A CONFIG_B CONFIG_C [KEY=VALUE ...] --cluster PROFILE      (an array)
    cascade submit --chain CHAIN.yaml --cluster PROFILE                               (in order)

Everything is checked before anything is submitted: the profile, the partition (against the
profile and, when Slurm answers, `sinfo`), GPUs and nodes against the profile, the run config at
the job's world size (nodes x tasks per node), the time limit and the warning lead, and in a
container the mounts (`preflight.py`). The config and the code are frozen at submission
(`<run_dir>/slurm/config.yaml`, `<log dir>/code/`, `snapshot.py`): a requeued job runs what was
submitted, whatever happened to the YAML or the checkout since (`--code live`: the checkout's code
as it is when the job starts).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from typing import List, Optional

from omegaconf import OmegaConf

from cascade_mega.config import ConfigError, load_config, to_yaml
from cascade_mega.runtime.provenance import ROOT
from cascade_mega.slurm import preflight, snapshot
from cascade_mega.slurm.profile import ClusterProfile, load_profile, seconds
from cascade_mega.slurm.script import Resources, stage_script, train_script


def add_arguments(p) -> None:
    p.add_argument("args", nargs="*", metavar="CONFIG [CONFIG ...] [KEY=VALUE ...]",
                   help="run config(s) and dotted overrides; several configs make a job array")
    p.set_defaults(overrides=[])
    p.add_argument("--cluster", required=True, help="profile: configs/clusters/NAME.yaml or a path")
    p.add_argument("--nodes", type=int, help="nodes per run (default: the profile's)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the profile's)")
    p.add_argument("--time", help="time limit (default: the profile's), e.g. 04:00:00")
    p.add_argument("--partition", help="partition (default: the profile's)")
    p.add_argument("--max-restarts", type=int, help="requeues before giving up")
    p.add_argument("--array-parallel", type=int, help="array tasks running at once")
    p.add_argument("--after", help="start after this job id succeeded (afterok)")
    p.add_argument("--chain", help="a YAML file of stages to run one after the other")
    p.add_argument("--code", choices=("package", "live"), default="package",
                   help="package (default): the job runs a copy of the code made now; live: "
                   "the checkout's code as it is when the job (or a requeue) starts")
    p.add_argument("--dry-run", action="store_true", help="print the script(s); submit nothing")


def resources(profile: ClusterProfile, args) -> Resources:
    for name in ("nodes", "gpus_per_node", "array_parallel"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "max_restarts", None) is not None and args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    nodes = args.nodes or profile.nodes
    gpus = profile.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    partition = args.partition or profile.partition
    if nodes < 1 or (profile.max_nodes and nodes > profile.max_nodes):
        raise ConfigError(f"--nodes {nodes}: profile {profile.name!r} allows 1 to "
                          f"{profile.max_nodes} nodes")
    if gpus > profile.max_gpus_per_node:
        raise ConfigError(f"{gpus} GPUs per node: profile {profile.name!r} nodes have "
                          f"{profile.max_gpus_per_node}")
    if profile.partitions and partition not in profile.partitions:
        raise ConfigError(f"partition {partition!r} is not one of profile {profile.name!r}'s: "
                          f"{', '.join(profile.partitions)}")
    if not getattr(args, "dry_run", False) and shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH: is this a Slurm login node? (--dry-run prints "
                          "the job script without submitting)")
    live = None if getattr(args, "dry_run", False) else cluster_partitions()
    if live is not None and partition not in live:
        raise ConfigError(f"partition {partition!r} does not exist on this cluster "
                          f"(sinfo: {', '.join(sorted(live)) or 'none'})")
    time_limit = args.time or profile.time_limit
    seconds(time_limit)
    tasks = profile.tasks_per_node or max(gpus, 1)
    return Resources(nodes, tasks, gpus, time_limit, partition)


def cluster_partitions() -> Optional[set]:
    """The partitions Slurm reports, or None when no Slurm answers here (e.g. a laptop)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


def _split(items: List[str]):
    configs = [a for a in items if "=" not in a]
    return configs, [a for a in items if "=" in a]


def prepare_run(config: str, overrides: List[str], profile, res) -> tuple:
    """(frozen config path, run dir, config) of one training run, checked at the job's world
    size against the time limit and the warning lead (warnings go to stderr); writes nothing."""
    cfg = load_config(config, overrides, world_size=res.nodes * res.tasks_per_node)
    for line in preflight.check_times(cfg, profile, res):
        print(f"cascade: {line}", file=sys.stderr, flush=True)
    run_dir = os.path.abspath(cfg.run_dir)
    return os.path.join(run_dir, "slurm", "config.yaml"), run_dir, replace(cfg, run_dir=run_dir)


def code_dir(mode: str, log_dir: str) -> str:
    return os.path.join(log_dir, "code") if mode == "package" else ROOT


def write_frozen(frozen: str, cfg) -> None:
    os.makedirs(os.path.dirname(frozen), exist_ok=True)
    with open(frozen, "w") as f:
        f.write(to_yaml(cfg))


def sbatch(script: str, path: str, after: Optional[str] = None) -> str:
    with open(path, "w") as f:
        f.write(script)
    cmd = ["sbatch", "--parsable"]
    if after:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    try:
        out = subprocess.run(cmd + [path], capture_output=True, text=True, timeout=60)
    except OSError as err:
        raise ConfigError(f"cannot run sbatch ({err}); is this a Slurm login node?") from None
    if out.returncode != 0:
        raise ConfigError(f"sbatch refused {path}: {out.stderr.strip().splitlines()[-1]}")
    return out.stdout.strip().split(";")[0]


def _record(run_dir: str, job_id: str, profile: str, res: Resources) -> None:
    with open(os.path.join(run_dir, "slurm", "jobs.jsonl"), "a") as f:
        f.write(json.dumps({"job_id": job_id, "profile": profile, "nodes": res.nodes,
                            "tasks_per_node": res.tasks_per_node, "time": res.time,
                            "submitted": time.time()}) + "\n")


def submit_train(configs: List[str], overrides: List[str], profile, res, *, dry_run=False,
                 after=None, max_restarts=None, array_parallel=None, job_name=None,
                 array_dir=None, code: str = "package", prepared=None) -> dict:
    """One run (one config) or an array (several): returns {job_id, run_dirs, script}. Every
    check passes before anything is written; then the configs and the code are frozen.
    `prepared`: the runs' `prepare_run` results, when the caller checked them already."""
    runs = prepared or [prepare_run(c, overrides, profile, res) for c in configs]
    frozen, run_dirs = [r[0] for r in runs], [r[1] for r in runs]
    if len(set(run_dirs)) < len(run_dirs):
        raise ConfigError("array tasks share a run directory: give each config its own run_dir")
    if len(runs) == 1:
        log_dir = os.path.join(run_dirs[0], "slurm")
    else:
        log_dir = array_dir or os.path.join(os.path.dirname(run_dirs[0]),
                                            f"_array-{time.strftime('%Y%m%d-%H%M%S')}")
    code_at = code_dir(code, log_dir)
    for _, run_dir, cfg in runs:
        preflight.check_mounts(profile, preflight.job_paths(cfg, run_dir, code_at))
    name = job_name or f"cascade-{runs[0][2].name}"
    script = train_script(profile, res, frozen, run_dirs, log_dir, name,
                          max_restarts if max_restarts is not None else profile.max_restarts,
                          array_parallel, code_at)
    if dry_run:
        return {"job_id": None, "run_dirs": run_dirs, "script": script}
    for path, _, cfg in runs:
        write_frozen(path, cfg)
    os.makedirs(log_dir, exist_ok=True)
    if code == "package":
        snapshot.freeze(code_at)
    job_id = sbatch(script, os.path.join(log_dir, "job.sbatch"), after)
    for d in run_dirs:
        _record(d, job_id, profile.name, res)
    return {"job_id": job_id, "run_dirs": run_dirs, "script": script, "log_dir": log_dir}


def submit_chain(path: str, profile, args) -> List[dict]:
    """Stages in order, each after the previous one succeeded. Every stage is checked first
    (a `run:` stage by the command line's own parser, which `cascade` hands its commands as
    `args.command_parser`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"chain file not found: {path}")
    stages = OmegaConf.to_container(OmegaConf.load(path)).get("stages") or []
    if not stages:
        raise ConfigError(f"{path}: no `stages:` to run")
    plans = []
    for i, st in enumerate(stages):
        name = st.get("name", f"stage{i}")
        unknown = set(st) - {"name", "train", "overrides", "run", "nodes", "time"}
        if unknown or ("train" in st) == ("run" in st):
            raise ConfigError(f"{path}: stage {name!r} needs exactly one of `train:` or `run:` "
                              f"(keys: name, train, overrides, run, nodes, time)")
        stage_args = argparse_copy(args, nodes=st.get("nodes"), time=st.get("time"))
        res = resources(profile, stage_args)
        if "train" in st:
            runs = prepare_run(st["train"], list(st.get("overrides") or []), profile, res)
            preflight.check_mounts(profile, preflight.job_paths(
                runs[2], runs[1], code_dir(args.code, os.path.join(runs[1], "slurm"))))
            plans.append(("train", name, st, res, runs))
        else:
            cmd = shlex.split(st["run"])
            try:
                args.command_parser.parse_args(cmd)
            except SystemExit:
                raise ConfigError(f"{path}: stage {name!r}: `cascade {st['run']}` is not a "
                                  "valid cascade command") from None
            plans.append(("run", name, cmd, res, None))
    log_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "slurm-chain")
    stages_code = code_dir(args.code, log_dir)
    preflight.check_mounts(profile, [("the chain's log directory", log_dir),
                                     ("the working directory", os.getcwd())])
    if args.code == "package" and not args.dry_run and any(p[0] == "run" for p in plans):
        os.makedirs(log_dir, exist_ok=True)
        snapshot.freeze(stages_code)
    out, after = [], args.after
    for kind, name, spec, res, prepared in plans:
        if kind == "train":
            r = submit_train([spec["train"]], [], profile, res, dry_run=args.dry_run, after=after,
                             job_name=f"cascade-{name}", code=args.code, prepared=[prepared])
        else:
            script = stage_script(profile, res, spec, log_dir, f"cascade-{name}", stages_code)
            r = {"job_id": None, "script": script, "run_dirs": []}
            if not args.dry_run:
                os.makedirs(log_dir, exist_ok=True)
                r["job_id"] = sbatch(script, os.path.join(log_dir, f"{name}.sbatch"), after)
        r["stage"] = name
        out.append(r)
        after = r["job_id"]
    return out


def argparse_copy(args, **changes):
    import argparse

    ns = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        if v is not None:
            setattr(ns, k, v)
    return ns


def run(args) -> int:
    profile = load_profile(args.cluster)
    if args.chain:
        results = submit_chain(args.chain, profile, args)
    else:
        configs, overrides = _split(list(args.args) + list(args.overrides))
        if not configs:
            raise ConfigError("give a run config (YAML), or --chain FILE")
        res = resources(profile, args)
        results = [submit_train(configs, overrides, profile, res, dry_run=args.dry_run,
                                after=args.after, max_restarts=args.max_restarts,
                                array_parallel=args.array_parallel, code=args.code)]
    for r in results:
        if args.dry_run:
            print(r["script"])
            continue
        label = f"{r['stage']}: " if "stage" in r else ""
        dirs = "  ".join(r["run_dirs"]) or "-"
        print(f"{label}submitted job {r['job_id']}  run_dir {dirs}", flush=True)
    return 0
