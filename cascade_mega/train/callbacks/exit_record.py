"""`<run_dir>/exit.json`: how this job's training ended, read by the Slurm job script's requeue
decision and `cascade jobs`.

{"outcome", "signal", "step", "time"}: 'running' from the start of `fit`, so a job killed
outright (nothing runs after a kill -9) shows as one that never ended; then 'finished',
'stopped' (left early to be resumed; `signal` names the scheduler's signal) or 'failed'; or
'killed', written by the `--nproc-per-node` launcher for ranks that ended without a record (its
grace time ran out, or a kill -9: `settle`). The
final record is written in `close`, and this component is installed first, so it closes last:
after the profiler and the heartbeats have ended, and before any `on_train_end` (the tracker's
flush may take long, and a kill during it must find the outcome already on disk). Rank 0 writes
it; every rank takes part so that rank 0 does when it is not the logging rank.
"""

from __future__ import annotations

import json
import os
import time

import torch.distributed as dist

from cascade_mega.train.callbacks.base import Callback

FILE = "exit.json"


class ExitRecord(Callback):
    every_rank = True

    def on_train_start(self, trainer):
        self.write(trainer, "running")

    def close(self, trainer):
        self.write(trainer, trainer.outcome)

    @staticmethod
    def write(trainer, outcome: str) -> None:
        if dist.get_rank() == 0:
            os.makedirs(trainer.run_dir, exist_ok=True)
            with open(os.path.join(trainer.run_dir, FILE), "w") as f:
                json.dump({"outcome": outcome, "signal": trainer.stop_signal,
                           "step": trainer.step, "time": time.time()}, f)


def settle(run_dir: str, outcome: str, received=None) -> str:
    """A record still 'running' once every process of the run has ended (killed before it could
    write the end) becomes `outcome`; returns the record's outcome (None: no record)."""
    path = os.path.join(run_dir, FILE)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("outcome") == "running":
        record.update(outcome=outcome, signal=record.get("signal") or received, time=time.time())
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    return record["outcome"]
