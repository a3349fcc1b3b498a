"""Trainer side concerns, one per file. A callback implements any of:
on_train_start(trainer), on_step_end(trainer, step, metrics), on_eval_end(trainer, step, metrics),
on_checkpoint_end(trainer, step, path), on_train_end(trainer) (`trainer.outcome` says how it ended). Only the logging rank (last pipeline stage, first TP and DP rank) runs them.
"""

from cascade_mega.train.callbacks.console import ConsoleProgress
from cascade_mega.train.callbacks.metrics_file import MetricsFile
from cascade_mega.train.callbacks.tracking import MlflowTracker

__all__ = ["ConsoleProgress", "MetricsFile", "MlflowTracker"]
