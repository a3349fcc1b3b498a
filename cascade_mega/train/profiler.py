"""`train.profile: [START, STOP]`: the torch profiler over steps START+1 .. STOP of a run.

Every rank records its own trace, `<run_dir>/profile/rank<R>.pt.trace.json` (Chrome trace format:
chrome://tracing, Perfetto, TensorBoard's profiler plugin, Holistic Trace Analysis), with CPU
and, on a GPU, CUDA activity, shapes and memory. The logging rank prints one line of the top
kernels by self time (device time on a GPU, host time on the CPU). Outside the window the
profiler does not exist, so it costs nothing.
"""

from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile, schedule


class StepProfiler:
    def __init__(self, window, run_dir: str, rank: int, on_gpu: bool, reports: bool):
        """`reports`: this rank returns the summary line (the logging rank)."""
        self.start, self.stop = window
        self.path = os.path.join(run_dir, "profile", f"rank{rank}.pt.trace.json")
        self.reports, self.on_gpu, self.prof = reports, on_gpu, None

    def before_step(self, step: int) -> None:
        """`step` is the number of steps done; profiling covers steps start+1 .. stop."""
        if step == self.start and self.prof is None:
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

    def _export(self, prof) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        prof.export_chrome_trace(self.path)

    def after_step(self, step: int) -> str | None:
        """The summary line once the window closed (on the reporting rank), else None."""
        if self.prof is None:
            return None
        if self.on_gpu:
            torch.cuda.synchronize()
        self.prof.step()
        if step < self.stop:
            return None
        return self.close()

    def close(self) -> str | None:
        """End the window (early, if the run stops inside it) and return the summary line."""
        if self.prof is None:
            return None
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)  # inside the window (a stop signal): traced here
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
