"""`<run_dir>/metrics.jsonl`: one JSON object per logged step, with `step`, `split` and metrics.

On resume, lines for steps after the checkpoint being resumed are dropped first, so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os

from cascade_mega.train.callbacks.base import Callback


class MetricsFile(Callback):
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")

    def on_train_start(self, trainer):
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec["step"] <= trainer.start_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(keep)

    def _write(self, step, split, metrics):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")

    def on_step_end(self, trainer, step, metrics):
        self._write(step, "train", metrics)

    def on_eval_end(self, trainer, step, metrics):
        self._write(step, "valid", metrics)
