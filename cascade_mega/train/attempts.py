"""One attempt, one history: a run that starts from step 0 moves an earlier attempt's outputs aside.

A run directory's history (metrics.jsonl, the checkpoints, the MLflow run it reports to, plots,
samples, exit.json) belongs to one attempt: a sequence of jobs that each resumed from the last
one's checkpoint. A start from step 0 over a directory that holds such outputs (`train.resume=
none`, or a restart after a crash or a kill before the first checkpoint) is a new attempt: the
old outputs move to `<run_dir>/attempts/<n>/` before anything is written, so nothing of the old
attempt is mixed into the new one (a later fallback can never resume from its checkpoints, the
metrics file holds one history) and nothing of it is lost.

The new attempt reports to a new MLflow run: MLflow cannot remove or replace a logged value, so
continuing the old run would keep the old attempt's values beside the new ones (and its
parameters: a restart in another precision). The new run's tag `cascade.previous_attempt`
names the old run, which is marked KILLED if it was left RUNNING (`callbacks/tracking.py`).
"""

from __future__ import annotations

import os

# what an attempt writes into the run directory (the store itself, mlflow.db and its artifacts,
# the Slurm job files, the config, the tokenizer and the lock belong to the directory)
OUTPUTS = ("metrics.jsonl", "checkpoints", "mlflow_run_id", "mlflow_journal.jsonl",
           "mlflow_journal.acked", "mlflow_pending", "plots", "samples", "exit.json",
           "memory.json", "heartbeat", "profile", "schedule_search.jsonl")
ARCHIVE = "attempts"


def earlier(run_dir: str) -> list:
    """The outputs of an earlier attempt present in `run_dir`."""
    return [name for name in OUTPUTS if os.path.exists(os.path.join(run_dir, name))]


def archive(run_dir: str) -> str | None:
    """Move an earlier attempt's outputs to `<run_dir>/attempts/<n>/`; returns that folder, or
    None when there was nothing to move."""
    found = earlier(run_dir)
    if not found:
        return None
    root = os.path.join(run_dir, ARCHIVE)
    os.makedirs(root, exist_ok=True)
    n = 1 + max((int(d) for d in os.listdir(root) if d.isdigit()), default=0)
    dest = os.path.join(root, str(n))
    os.makedirs(dest)
    for name in found:
        os.replace(os.path.join(run_dir, name), os.path.join(dest, name))
    return dest


def latest_archive(run_dir: str) -> str | None:
    """The newest archived attempt's folder, or None."""
    root = os.path.join(run_dir, ARCHIVE)
    numbers = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    return os.path.join(root, str(max(numbers))) if numbers else None
