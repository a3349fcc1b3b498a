"""One progress line per logging interval and per evaluation, and the operator's lines at start.

A step line ends with the tokens seen so far, the time left at this job's pace and a timestamp:

    step   100/500 | loss 5.2510 | ... | step_time 0.511s | tokens 410k | eta 0:03:24 | 13:30:05

At start: the model's size, the layout, the data (tokens and documents of the train split, and
the epochs the run's token budget implies) and the code (commit, uncommitted changes, where from):

    model 1,234,560 parameters (983,040 without embeddings) | layout TP 1 x PP 1 x CP 1 x DP 2
    data /data/web: train split 9.87B tokens in 4.1M documents | budget 20.1B tokens = 2.04 epochs
    code 4ec1e48a9f3c + uncommitted changes from /lustre/me/runs/r1/slurm/code

A resumed run then says where it resumed from and names each setting that differs from the
config its checkpoint was saved under (a changed `train.steps` or schedule shows here).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta

from cascade_mega.runtime import provenance
from cascade_mega.train.callbacks.base import Callback


def _fmt(metrics: dict) -> str:
    parts = []
    for key, fmt in (("loss", "{:.4f}"), ("nelbo", "{:.4f}"), ("ppl_bound", "{:.1f}"),
                     ("ppl_bound_common", "{:.1f}"), ("ppl_bound_ce", "{:.1f}"),
                     ("schedule_t_min", "{:g}"),
                     ("schedule_t_max", "{:g}"),
                     ("masked_acc", "{:.3f}"), ("ar_loss", "{:.4f}"), ("distill_kl", "{:.4f}"),
                     ("moe/aux_loss", "{:.4f}"), ("moe/load_max", "{:.2f}"),
                     ("block_size", "{}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
                     ("tokens_per_s", "{:.0f}"), ("step_time", "{:.3f}s")):
        if key in metrics:
            parts.append(f"{key} " + fmt.format(metrics[key]))
    return " | ".join(parts)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def start_lines(trainer, budget: int) -> list:
    total, body = trainer.parameters
    lay = trainer.layout()
    documents, tokens = trainer.train_split
    epochs = f" = {budget / tokens:.3g} epochs" if tokens else ""
    return [f"model {total:,} parameters ({body:,} without embeddings) | layout TP "
            f"{lay['tensor']} x PP {lay['pipeline']} x CP {lay['context']} x DP {lay['data']}"
            + (f" | experts EP {lay['expert']} x expert-TP {lay['expert_tensor']}"
               if trainer.cfg.model.moe.enabled else ""),
            f"data {trainer.cfg.data.path}: train split {_count(tokens)} tokens in "
            f"{_count(documents)} documents | budget {_count(budget)} tokens{epochs}",
            provenance.summary(trainer.code_dir)]


class ConsoleProgress(Callback):
    def __init__(self, total_steps: int, stream=None):
        self.total, self.stream = total_steps, stream or sys.stdout
        self.started, self.first_step, self.tokens_per_step = time.monotonic(), 0, 0

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def on_train_start(self, trainer):
        self.started, self.first_step = time.monotonic(), trainer.start_step
        cfg = trainer.cfg
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        for line in start_lines(trainer, self.tokens_per_step * self.total):
            self._print(line)
        if getattr(trainer, "resumed_from", None):
            self._print(f"resumed from {trainer.resumed_from} at step {trainer.start_step}")
            changes = getattr(trainer, "resume_changes", [])
            if changes:
                self._print("changed since that checkpoint: " + "; ".join(
                    f"{key} {old!r} -> {new!r}" for key, old, new in changes))

    def on_step_end(self, trainer, step, metrics):
        done = step - self.first_step
        left = (time.monotonic() - self.started) / max(done, 1) * (self.total - step)
        self._print(f"step {step:>6}/{self.total} | {_fmt(metrics)} | tokens "
                    f"{_count(step * self.tokens_per_step)} | eta "
                    f"{timedelta(seconds=round(left))} | {datetime.now():%H:%M:%S}")

    def on_eval_end(self, trainer, step, metrics):
        self._print(f"eval {step:>6}/{self.total} | {_fmt(metrics)}")

    def on_train_end(self, trainer):
        if getattr(trainer, "stop_signal", None):
            self._print(f"stopped after step {trainer.step} on {trainer.stop_signal}: "
                        "checkpoint written, resume continues from it")
