"""Every rank's heartbeat file (`runtime/heartbeat.py`: `<run_dir>/heartbeat/rank<R>.json`), kept
for the span of `fit`: started with it, told each finished step and the rank's peak memory right
after the step (before logging or evaluation, so the step's time is when it finished), marked
closed when `fit` ends however it ends, so an ended rank is never named as stopped.
"""

from __future__ import annotations

import torch.distributed as dist

from cascade_mega.runtime import heartbeat
from cascade_mega.train.callbacks.base import Callback


class HeartbeatFile(Callback):
    every_rank = True

    def __init__(self):
        self.beat = None

    def on_train_start(self, trainer):
        self.beat = heartbeat.Heartbeat(trainer.run_dir, dist.get_rank(),
                                        trainer.cfg.train.heartbeat_s, trainer.world_size)

    def post_step(self, trainer, step, metrics):
        self.beat.step(step, metrics["memory_gb"])

    def close(self, trainer):
        if self.beat is not None:
            beat, self.beat = self.beat, None
            beat.close()
