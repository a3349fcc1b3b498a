"""Stop requests from the scheduler, honoured at a step boundary on every rank at once.

Slurm warns a job before its time limit with the signal it asked for (`sbatch --signal=B:USR1@T`,
forwarded to the ranks by the job script) and preempts it with SIGTERM. The handler only records
the signal; after each step the ranks agree on it (a MAX all-reduce of one number, over gloo on
the host so it never waits for the GPU; a signal that reached some ranks a moment later still
stops all of them after the same step), then the
trainer writes a checkpoint and returns with `outcome = 'stopped'`. The job script requeues after
a time-limit warning; Slurm requeues a preempted job itself.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

# SIGINT (Ctrl-C) stops like the scheduler's signals, at a step with a checkpoint; a second one
# interrupts at once (KeyboardInterrupt)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    def __init__(self):
        self.received = 0
        self.interrupted = False
        self.previous = {}

    def install(self) -> "StopSignals":
        # the agreement runs over gloo on the host: a NCCL all-reduce of a device tensor would
        # make every step wait for the device to read the flag back (collective: every rank
        # installs at the same point)
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" \
                else dist.group.WORLD
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._record)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _record(self, signum, frame):
        if signum == signal.SIGINT and self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = self.interrupted or signum == signal.SIGINT
        self.received = max(self.received, int(signum))

    def agreed(self) -> Optional[str]:
        """The stop signal any rank received (its name), or None. Collective when distributed."""
        value = self.received
        if getattr(self, "group", None) is not None:
            flag = torch.tensor([value], dtype=torch.int64)  # host, on purpose (see install)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            value = int(flag.item())
        return signal.Signals(value).name if value else None
