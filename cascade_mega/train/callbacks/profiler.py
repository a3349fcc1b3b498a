"""`train.profile: [START, STOP]`: the torch profiler over steps START+1 .. STOP of a run.

Every rank records its own trace, `<run_dir>/profile/rank<R>.pt.trace.json` (Chrome trace format:
chrome://tracing, Perfetto, TensorBoard's profiler plugin, Holistic Trace Analysis), with CPU
and, on a GPU, CUDA activity, shapes and memory. The logging rank prints one line of the top
kernels by self time (device time on a GPU, host time on the CPU) when the window closes. Outside
the window the profiler does not exist, so it costs nothing; without `train.profile` the hooks
do nothing. A run that stops inside the window ends it in `close` (the trace is written, no line
is printed).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, schedule

from cascade_mega.runtime import device
from cascade_mega.train.callbacks.base import Callback


class StepProfiler(Callback):
    every_rank = True

    def __init__(self):
        self.window, self.prof = None, None

    def on_train_start(self, trainer):
        self.window = trainer.cfg.train.profile
        if self.window:
            self.start, self.stop = self.window
            self.path = os.path.join(trainer.run_dir, "profile",
                                     f"rank{dist.get_rank()}.pt.trace.json")
            self.reports, self.on_gpu = trainer.is_logger, device.on_gpu()

    def pre_step(self, trainer, step):
        """`step` is the number of steps done; profiling covers steps start+1 .. stop."""
        if self.window and step == self.start and self.prof is None:
            import warnings

            if os.path.isfile(self.path):  # an earlier job's trace of the same window
                os.remove(self.path)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
            # one active window (its steps marked ProfilerStep#0, #1, ...), traced when it ends
            window = schedule(wait=0, warmup=0, active=self.stop - self.start, repeat=1)
            with warnings.catch_warnings():  # "no warmup": the window is the user's to choose
                warnings.simplefilter("ignore")
                self.prof = profile(activities=activities, schedule=window, record_shapes=True,
                                    profile_memory=True, on_trace_ready=self._export)
            self.prof.__enter__()
        return None

    def _export(self, prof) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        prof.export_chrome_trace(self.path)

    def post_step(self, trainer, step, metrics):
        """Mark the step; once the window closed, the summary line (on the reporting rank)."""
        if self.prof is None:
            return
        if self.on_gpu:
            torch.cuda.synchronize()
        self.prof.step()
        if step >= self.stop and (line := self.end()):
            print(line, flush=True)

    def close(self, trainer):
        self.end()  # inside the window (a stop signal, an error): traced here

    def end(self) -> str | None:
        """End the window and return the summary line (the reporting rank's), else None."""
        if self.prof is None:
            return None
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        if not self.reports:
            return None
        key = "self_device_time_total" if self.on_gpu else "self_cpu_time_total"
        events = [e for e in prof.key_averages() if getattr(e, key) > 0
                  and not e.key.startswith("ProfilerStep")]
        events.sort(key=lambda e: -getattr(e, key))
        total = sum(getattr(e, key) for e in events) or 1
        top = ", ".join(f"{e.key} {100 * getattr(e, key) / total:.0f}%" for e in events[:5])
        return (f"profile of steps {self.start + 1}-{self.stop}: {os.path.dirname(self.path)}/"
                f"rank*.pt.trace.json; top by self {'device' if self.on_gpu else 'host'} time: "
                f"{top}")
