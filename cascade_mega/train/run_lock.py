"""One trainer per run directory: `<run_dir>/LOCK`, a file with its holder's host, PID, Slurm job
and a heartbeat time.

`flock` is node-local on many cluster filesystems, so the lock is a plain file: created with
O_EXCL (one of two trainers starting together gets it), its `beat` rewritten every `interval`
seconds by a daemon thread of the holder (rank 0), removed when the trainer ends. A second
trainer finding a live lock stops with one message naming the holder, before it writes
anything. A lock whose holder is gone is taken over with a warning:
- the same host and its PID no longer exists (a kill -9, a crash): at once;
- the same Slurm job (a requeued job keeps its id): at once;
- otherwise when `beat` is older than `stale_after` (a lost node, a frozen process).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from cascade_mega.errors import UserError

NAME = "LOCK"


class RunDirInUse(UserError, RuntimeError):
    """Another live trainer holds the run directory."""


def _pid_alive(pid: int) -> bool:
    """Running on this host: not gone, and not a zombie (a killed trainer's process can wait
    for a reaper long after it stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process
            return True
        return True


class RunLock:
    def __init__(self, run_dir: str, interval: float = 10.0, stale_after: float = 60.0):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, NAME)
        self.interval, self.stale_after = interval, max(stale_after, 3 * interval)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "job": os.environ.get("SLURM_JOB_ID") or None}
        self.created_dir = False
        self._stop = threading.Event()
        self._thread = None

    def _record(self) -> str:
        return json.dumps({**self.me, "beat": time.time()})

    def _write(self) -> None:
        tmp = f"{self.path}.{self.me['pid']}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(self._record())
            os.replace(tmp, self.path)
        finally:  # a full disk: no temporary file left behind
            if os.path.exists(tmp):
                os.remove(tmp)

    def holder(self):
        """The lock's record, or None (no lock, or one being written)."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _why_not_take(self, held: dict) -> str:
        """'' when the holder is gone (the lock may be taken), else what keeps it."""
        if held.get("host") == self.me["host"] and held.get("pid") == self.me["pid"]:
            return ""
        if self.me["job"] and held.get("job") == self.me["job"]:
            return ""  # this job's earlier start (a requeue)
        if held.get("host") == self.me["host"] and not _pid_alive(int(held.get("pid", -1))):
            return ""
        age = time.time() - float(held.get("beat", 0))
        if age > self.stale_after:
            return ""
        job = f", Slurm job {held['job']}" if held.get("job") else ""
        return (f"{self.run_dir} is in use by the trainer on {held.get('host')} (PID "
                f"{held.get('pid')}{job}; heartbeat {age:.0f} s ago): wait for it to end, or "
                f"train into another run_dir (a lock whose trainer died is taken over once its "
                f"heartbeat is {self.stale_after:.0f} s old)")

    def acquire(self) -> "RunLock":
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            from cascade_mega.config import ConfigError

            raise ConfigError(f"'run_dir' = {self.run_dir} is a file, not a directory")
        if not os.path.isdir(self.run_dir):
            os.makedirs(self.run_dir, exist_ok=True)
            self.created_dir = True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(self._record())
        except FileExistsError:
            held = self.holder()
            if held is None:  # being written by another trainer this moment: look again
                time.sleep(0.5)
                held = self.holder() or {}
            why = self._why_not_take(held) if held else ""
            if why:
                self._cleanup_dir()
                raise RunDirInUse(why) from None
            if held and (held.get("host"), held.get("pid")) != (self.me["host"], self.me["pid"]):
                print(f"warning: taking over the lock of {self.run_dir} from {held.get('host')} "
                      f"PID {held.get('pid')} (that trainer is gone)", file=sys.stderr,
                      flush=True)
            self._write()
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except OSError:  # a filesystem hiccup: the next beat tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.holder()
        if held and (held.get("host"), held.get("pid")) == (self.me["host"], self.me["pid"]):
            try:
                os.remove(self.path)
            except OSError:
                pass
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        """A run directory this lock created and nothing else wrote to goes again."""
        if self.created_dir:
            try:
                os.rmdir(self.run_dir)
            except OSError:
                pass


def clear_dead(run_dir: str) -> bool:
    """Remove the lock of a trainer of this host that is gone (what a launcher does once its
    ranks have ended: none of them holds it any more). True when one was removed."""
    lock = RunLock(run_dir)
    held = lock.holder()
    if held and held.get("host") == lock.me["host"] and not _pid_alive(int(held.get("pid", -1))):
        try:
            os.remove(lock.path)
            return True
        except OSError:
            pass
    return False
