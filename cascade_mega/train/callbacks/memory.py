"""Once per job, early: every rank's peak memory, gathered, in one line on the logging rank and
in `<run_dir>/memory.json` ({"step", "peak_gb": [per rank]}).

Early (`MEMORY_AFTER` steps of this job: the first steps allocate what the run will hold), or at
the end of a shorter run. The gather is a collective, so every rank takes part; rank 0 writes the
file, the logging rank prints the line (peak GPU memory allocated by torch, or on the CPU the
resident memory: the step's `memory_gb`).
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from cascade_mega.runtime import device
from cascade_mega.train.callbacks.base import Callback

MEMORY_AFTER = 3  # steps of this job after which every rank's peak memory is reported
FILE = "memory.json"


class MemoryReport(Callback):
    every_rank = True

    def post_step(self, trainer, step, metrics):
        if step == min(trainer.start_step + MEMORY_AFTER, trainer.cfg.train.steps):
            self.report(trainer, step, metrics["memory_gb"])

    @staticmethod
    def report(trainer, step: int, mine: float) -> None:
        peaks = [torch.zeros(1, dtype=torch.float64, device=device.current())
                 for _ in range(trainer.world_size)]
        dist.all_gather(peaks, torch.tensor([mine], dtype=torch.float64,
                                            device=device.current()))
        peaks = torch.cat(peaks).tolist()  # one copy to the host
        top = max(range(len(peaks)), key=peaks.__getitem__)
        if dist.get_rank() == 0:
            with open(os.path.join(trainer.run_dir, FILE), "w") as f:
                json.dump({"step": step, "peak_gb": peaks}, f)
        if trainer.is_logger:
            kind = "GPU memory" if device.on_gpu() else "resident memory"
            print(f"peak {kind} after step {step}: max {peaks[top]:.2f} GiB (rank {top}), "
                  f"min {min(peaks):.2f} GiB over {len(peaks)} ranks; per rank in "
                  f"{trainer.run_dir}/{FILE}", flush=True)
