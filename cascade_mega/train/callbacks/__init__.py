"""Trainer-side concerns, one per file, on the hooks of `base.Callback` (`base.py` says when each
runs and on which ranks).

The trainer's own components (`builtin`, every rank, installed by `Trainer` itself ahead of any
other, so none can be left out): the exit record (`exit.json`), the heartbeat files, the schedule
search, the step profiler (`train.profile`), the memory report (`memory.json`) and checkpoints.
The callbacks of `cascade train` (`standard`, the logging rank): the console line,
`metrics.jsonl`, the MLflow tracker (its own thread), sample generations and loss plots (handed
to the tracker as artifacts)."""

from cascade_mega.train.callbacks.base import Callback
from cascade_mega.train.callbacks.checkpointer import Checkpointer
from cascade_mega.train.callbacks.console import ConsoleProgress
from cascade_mega.train.callbacks.exit_record import ExitRecord
from cascade_mega.train.callbacks.heartbeat import HeartbeatFile
from cascade_mega.train.callbacks.memory import MemoryReport
from cascade_mega.train.callbacks.metrics_file import MetricsFile
from cascade_mega.train.callbacks.plots import LossPlots
from cascade_mega.train.callbacks.profiler import StepProfiler
from cascade_mega.train.callbacks.samples import SampleGenerations
from cascade_mega.train.callbacks.schedule_search import ScheduleSearch
from cascade_mega.train.callbacks.tracking import MlflowTracker

__all__ = ["Callback", "Checkpointer", "ConsoleProgress", "ExitRecord", "HeartbeatFile",
           "LossPlots", "MemoryReport", "MetricsFile", "MlflowTracker", "SampleGenerations",
           "ScheduleSearch", "StepProfiler"]


def builtin() -> list:
    """The trainer's components, in the order they must run: the exit record first (so it closes
    last, once the rest has ended), the heartbeat (told of a step before the profiler's window
    may export), the schedule search before the profiler's window opens, and the memory report
    and checkpoints after the step."""
    return [ExitRecord(), HeartbeatFile(), ScheduleSearch(), StepProfiler(), MemoryReport(),
            Checkpointer()]


def standard(cfg) -> list:
    """The callbacks of `cascade train`, in the order they must run: samples and plots hand
    their artifacts to the tracker before it flushes at the end."""
    callbacks = [ConsoleProgress(cfg.train.steps), MetricsFile(cfg.run_dir)]
    if cfg.tracking.enabled:
        tracker = MlflowTracker(cfg, cfg.run_dir)
        callbacks += [SampleGenerations(cfg, tracker), LossPlots(cfg.run_dir, tracker), tracker]
    return callbacks
