"""One progress line per logging interval and per evaluation."""

from __future__ import annotations

import sys


def _fmt(metrics: dict) -> str:
    parts = []
    for key, fmt in (("loss", "{:.4f}"), ("nelbo", "{:.4f}"), ("ppl_bound", "{:.1f}"),
                     ("masked_acc", "{:.3f}"), ("ar_loss", "{:.4f}"), ("distill_kl", "{:.4f}"),
                     ("block_size", "{}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
                     ("tokens_per_s", "{:.0f}"), ("step_time", "{:.3f}s")):
        if key in metrics:
            parts.append(f"{key} " + fmt.format(metrics[key]))
    return " | ".join(parts)


class ConsoleProgress:
    def __init__(self, total_steps: int, stream=None):
        self.total, self.stream = total_steps, stream or sys.stdout

    def on_step_end(self, trainer, step, metrics):
        print(f"step {step:>6}/{self.total} | {_fmt(metrics)}", file=self.stream, flush=True)

    def on_eval_end(self, trainer, step, metrics):
        print(f"eval {step:>6}/{self.total} | {_fmt(metrics)}", file=self.stream, flush=True)

    def on_train_end(self, trainer):
        if getattr(trainer, "stop_signal", None):
            print(f"stopped after step {trainer.step} on {trainer.stop_signal}: checkpoint "
                  "written, resume continues from it", file=self.stream, flush=True)
