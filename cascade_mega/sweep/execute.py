"""Running a sweep: each run's state, the MLflow parent run, and the two executors.

A run directory says where a run stands: `exit.json` with outcome `finished` is done and skipped;
a run with checkpoints resumes from its latest (the trainer's `train.resume=auto`); a run whose
Slurm job is still queued or running is left alone. Each run's config is frozen beside the others
in `<root>/configs/<run>.yaml`, so the local executor and a Slurm array run the same files.

The local executor runs `cascade train` per run, one after the other, in child processes (a
failure is recorded and the sweep goes on). The Slurm executor submits the runs still to do as one
job array through `cascade submit`'s machinery, after checking every run against the cluster
profile (world size, time limit, GPU memory) so that nothing is submitted when one would not fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List

from cascade_mega.config import ConfigError, to_yaml
from cascade_mega.sweep.spec import Run, Sweep


def run_state(run: Run) -> str:
    """finished | failed | stopped | running | queued | new  (from the run directory)."""
    run_dir = run.cfg.run_dir
    path = os.path.join(run_dir, "exit.json")
    outcome = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                outcome = json.load(f).get("outcome")
        except (OSError, ValueError):
            outcome = None
    if outcome == "finished":
        return "finished"
    if _queued(run_dir):
        return "queued"
    if outcome in ("failed", "stopped", "running"):
        return outcome  # 'running' without a live job: the process died; it resumes
    if os.path.exists(os.path.join(run_dir, "sweep.log")):
        return "failed"  # started by the sweep, stopped before training began
    return "new"


def _queued(run_dir: str) -> bool:
    from cascade_mega.slurm.jobs import job_state
    from cascade_mega.slurm.requeue import read_jsonl

    jobs = read_jsonl(os.path.join(run_dir, "slurm", "jobs.jsonl"))
    if not jobs:
        return False
    return job_state(jobs[-1]["job_id"])["source"] == "squeue"


def freeze(sweep: Sweep, runs: List[Run]) -> List[str]:
    """Write each run's resolved config to <root>/configs/<run>.yaml; return the paths."""
    folder = os.path.join(sweep.root, "configs")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for run in runs:
        path = os.path.join(folder, f"{run.name}.yaml")
        with open(path, "w") as f:
            f.write(to_yaml(run.cfg))
        paths.append(path)
    return paths


def parent_run(sweep: Sweep, runs: List[Run]) -> str | None:
    """The sweep's MLflow parent run (created once, id kept in <root>/sweep.json): runs nest under
    it and carry the tag cascade.group = sweep name. None when the store does not answer."""
    from cascade_mega.tracking import store

    record_path = os.path.join(sweep.root, "sweep.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("uri") == sweep.uri and record.get("parent_run_id"):
            return record["parent_run_id"]
    store.check_uri(sweep.uri)
    store.configure_http()
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(sweep.uri)
        exp_id = store.experiment_id(client, sweep.experiment or sweep.name)
        parent = client.create_run(exp_id, run_name=sweep.name, tags={
            "cascade.group": sweep.name, "cascade.sweep": "parent",
            "cascade.sweep_file": sweep.path})
        client.log_param(parent.info.run_id, "runs", len(runs))
        client.log_artifact(parent.info.run_id, sweep.path)
        client.set_terminated(parent.info.run_id, "FINISHED")
    except Exception as err:  # noqa: BLE001  (the runs track on their own; grouping is by tag)
        store.warn(f"tracking store {sweep.uri} did not take the sweep's parent run: "
                   f"{str(err).strip().splitlines()[0]}")
        return None
    with open(record_path, "w") as f:
        json.dump({"name": sweep.name, "uri": sweep.uri,
                   "parent_run_id": parent.info.run_id}, f)
    return parent.info.run_id


def run_local(sweep: Sweep, runs: List[Run], states: dict, paths: List[str]) -> dict:
    """Train the runs still to do, one by one; {run name: final state}."""
    todo = [(r, p) for r, p in zip(runs, paths) if states[r.name] not in ("finished", "queued")]
    results = {}
    for i, (run, path) in enumerate(todo, 1):
        os.makedirs(run.cfg.run_dir, exist_ok=True)
        log = os.path.join(run.cfg.run_dir, "sweep.log")
        verb = "resumes" if states[run.name] in ("stopped", "failed", "running") else "starts"
        print(f"[{i}/{len(todo)}] {run.name} {verb}  (N {run.params:.3g}, D {run.tokens:.3g}, "
              f"C {run.flops:.3g} FLOPs)  log: {log}", flush=True)
        began = time.time()
        with open(log, "a") as f:
            rc = subprocess.call([sys.executable, "-m", "cascade_mega", "train", path],
                                 stdout=f, stderr=subprocess.STDOUT)
        results[run.name] = run_state(run) if rc == 0 else "failed"
        tail = ""
        if rc != 0:
            with open(log) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            tail = f": {lines[-1] if lines else 'no output'}"
        print(f"    {results[run.name]} (exit {rc}) in {time.time() - began:.0f} s{tail}",
              flush=True)
    return results


def check_slurm(sweep: Sweep, runs: List[Run], profile, res, dry_run: bool) -> None:
    """Every run must fit the profile before anything is submitted."""
    from cascade_mega.plan import plan
    from cascade_mega.slurm.preflight import check_times, dataset_vocab

    for run in runs:
        try:
            check_times(run.cfg, profile, res)
            if profile.gpu_memory_gb and res.gpus_per_node:
                vocab = run.cfg.model.vocab_size or dataset_vocab(run.cfg)
                need = plan(run.cfg, res.nodes * res.tasks_per_node, vocab).peak() / 1024 ** 3
                if need > profile.gpu_memory_gb:
                    raise ConfigError(f"needs {need:.1f} GiB per GPU (cascade plan), more than "
                                      f"the profile's {profile.gpu_memory_gb:g} GiB")
        except ConfigError as err:
            raise ConfigError(f"sweep {sweep.name}: run {run.name} does not fit cluster profile "
                              f"{profile.name!r}: {err}") from None


def run_slurm(sweep: Sweep, runs: List[Run], states: dict, paths: List[str], profile, res,
              dry_run: bool) -> dict:
    from cascade_mega.slurm.submit import submit_train

    todo = [p for r, p in zip(runs, paths) if states[r.name] not in ("finished", "queued")]
    if not todo:
        return {"job_id": None, "run_dirs": [], "script": ""}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return submit_train(todo, [], profile, res, dry_run=dry_run,
                        array_parallel=sweep.array_parallel, job_name=f"sweep-{sweep.name}",
                        array_dir=os.path.join(sweep.root, "slurm", stamp))
