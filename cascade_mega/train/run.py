"""Entry point for one training run: trainer plus the standard callbacks."""

from __future__ import annotations

from cascade_mega.train.callbacks import ConsoleProgress, MetricsFile, MlflowTracker
from cascade_mega.train.trainer import Trainer


def train(cfg):
    callbacks = [ConsoleProgress(cfg.train.steps), MetricsFile(cfg.run_dir)]
    if cfg.tracking.enabled:
        callbacks.append(MlflowTracker(cfg, cfg.run_dir))
    trainer = Trainer(cfg, callbacks).setup()
    trainer.fit()
    return trainer
