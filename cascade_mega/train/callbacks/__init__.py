"""Trainer-side concerns, one per file, on the hooks of `base.Callback` (the logging rank only):
the console line, `metrics.jsonl`, the MLflow tracker (its own thread), sample generations and
loss plots (handed to the tracker as artifacts)."""

from cascade_mega.train.callbacks.base import Callback
from cascade_mega.train.callbacks.console import ConsoleProgress
from cascade_mega.train.callbacks.metrics_file import MetricsFile
from cascade_mega.train.callbacks.plots import LossPlots
from cascade_mega.train.callbacks.samples import SampleGenerations
from cascade_mega.train.callbacks.tracking import MlflowTracker

__all__ = ["Callback", "ConsoleProgress", "LossPlots", "MetricsFile", "MlflowTracker",
           "SampleGenerations"]


def standard(cfg) -> list:
    """The callbacks of `cascade train`, in the order they must run: samples and plots hand
    their artifacts to the tracker before it flushes at the end."""
    callbacks = [ConsoleProgress(cfg.train.steps), MetricsFile(cfg.run_dir)]
    if cfg.tracking.enabled:
        tracker = MlflowTracker(cfg, cfg.run_dir)
        callbacks += [SampleGenerations(cfg, tracker), LossPlots(cfg.run_dir, tracker), tracker]
    return callbacks
