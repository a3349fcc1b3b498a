"""Per-rank heartbeat files: which rank of a slow or stuck job stopped progressing.

Each rank keeps `<run_dir>/heartbeat/rank<R>.json` up to date: host, pid, the last finished step
and when it finished, its peak memory, and `beat`, rewritten every `interval` seconds by a daemon
thread. The two clocks tell the cases apart:
- `beat` old: the process itself is stopped (SIGSTOP, a dead node, a hung driver call);
- `beat` fresh but the step old: the rank is alive and waiting, usually in a collective for a
  rank of the first kind.

    python -m cascade_mega.runtime.heartbeat RUN_DIR [--stale-after S]

prints one line per rank that stopped (what the Slurm job script runs when a step fails, in the
batch shell: standard library only, Python 3.6 syntax); `cascade jobs` shows the same. A rank
that ended (finished, stopped, crashed through Python) marks its file closed and is never
named; at start rank 0 removes the files of ranks the new world does not have.
"""

import argparse
import glob
import json
import os
import socket
import threading
import time
from typing import Optional


def folder(run_dir: str) -> str:
    return os.path.join(run_dir, "heartbeat")


class Heartbeat:
    """This rank's file; `step(n, memory_gb)` after each step; `close()` stops the thread."""

    def __init__(self, run_dir: str, rank: int, interval: float = 10.0, world_size: int = 1):
        os.makedirs(folder(run_dir), exist_ok=True)
        if rank == 0:  # a smaller world than the last job's: its extra ranks are gone
            for path in glob.glob(os.path.join(folder(run_dir), "rank*.json")):
                name = os.path.basename(path)[4:-5]
                if name.isdigit() and int(name) >= world_size:
                    os.remove(path)
        self.path = os.path.join(folder(run_dir), f"rank{rank}.json")
        self.state = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                      "job": os.environ.get("SLURM_JOB_ID"), "interval": interval,
                      "step": None, "step_time": time.time(), "memory_gb": None,
                      "closed": False}
        self.interval, self._stop = interval, threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.state["beat"] = time.time()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except OSError:  # a full or vanished file system must not stop the training
                pass

    def step(self, step: int, memory_gb: Optional[float] = None) -> None:
        self.state.update(step=step, step_time=time.time())
        if memory_gb is not None:
            self.state["memory_gb"] = memory_gb

    def close(self) -> None:
        """The rank ended: its file says so (and is never named as stopped)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.state["closed"] = True
        try:
            self._write()
        except OSError:
            pass


def read(run_dir: str) -> list:
    out = []
    for path in sorted(glob.glob(os.path.join(folder(run_dir), "rank*.json"))):
        try:
            with open(path) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r["rank"])


def stalled(run_dir: str, stale_after: Optional[float] = None, now: Optional[float] = None) -> list:
    """One line per rank whose process stopped beating (longer than `stale_after`, default three
    of its intervals), then, when any did, how far the others got."""
    now = time.time() if now is None else now
    ranks = read(run_dir)
    lines, alive = [], []
    for r in ranks:
        if r.get("closed"):
            continue
        limit = stale_after if stale_after is not None else 3 * r.get("interval", 10.0)
        silent = now - r["beat"]
        if silent > limit:
            lines.append(f"rank {r['rank']} ({r['host']}, pid {r['pid']}) stopped: no heartbeat "
                         f"for {silent:.0f} s, last step {r['step']}")
        else:
            alive.append(r)
    if lines and alive:
        steps = sorted({r["step"] for r in alive}, key=lambda s: -1 if s is None else s)
        waiting = max(now - r["step_time"] for r in alive)
        lines.append(f"the other {len(alive)} ranks are alive at step "
                     f"{'/'.join(map(str, steps))}, waiting up to {waiting:.0f} s")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cascade_mega.runtime.heartbeat")
    p.add_argument("run_dir")
    p.add_argument("--stale-after", type=float, help="seconds without a heartbeat (default: 3 "
                   "of the rank's intervals)")
    args = p.parse_args(argv)
    for line in stalled(args.run_dir, args.stale_after):
        print(f"heartbeat: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
