"""The launcher `cascade train CONFIG --nproc-per-node N` uses: torchrun, run for the user.

It starts N ranks of `cascade train` on this node (`--nnodes` > 1: one such call per node,
meeting at `--rdzv-endpoint`); each rank reads its place from torchrun's environment
(`cascade_mega/runtime/env.py`). The parent validated the config before calling this, so a bad
config never starts a rank. Ranks started by another launcher (Slurm's `srun`, a torchrun line
of one's own) need nothing from here.

Signals (TERM: preemption or `timeout`; USR1: a scheduler's time-limit warning; INT: Ctrl-C)
sent to this launcher alone are forwarded to the ranks, which checkpoint the step in flight and
stop (`cascade_mega/train/signals.py`); the launcher waits for them up to a grace time it states
(`train.stop_grace_s`), then kills them. torchrun runs in a session of its own, so a Ctrl-C to
the terminal's process group reaches this launcher only and torchrun never meets a signal (its
own handling would kill the ranks within 30 s and end in a traceback). The ranks are found as
torchrun's child processes (each in a session of its own, torchrun's choice). The launcher
installs its handlers before it starts anything, so the same holds when it is a container's
PID 1 (which ignores any signal it has no handler for).

Stdlib only: it runs before the ranks import torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (`prctl(PR_SET_PDEATHSIG)`): torchrun
    when `cascade train` is killed outright, a rank when torchrun is. A kill -9 then leaves no rank
    training on, holding the run directory and its GPU, under PID 1 (saves are atomic: the last
    complete checkpoint stays). Elsewhere (not Linux): nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def command(config: str, overrides, nproc_per_node: int, nnodes: int = 1,
            rdzv_endpoint: str = "127.0.0.1:29500") -> list:
    """The torchrun command line that starts this node's ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--nnodes={nnodes}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    return cmd + ["-m", "cascade_mega", "train", config, *overrides]


class Forwarder:
    """Passes this process's stop signals to torchrun's ranks, and kills them all when they have
    not ended `grace_s` after the first one."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, proc: subprocess.Popen, grace_s: float):
        self.proc, self.grace_s = proc, grace_s
        self.received, self.killed = None, False
        self._timer = None

    def install(self) -> dict:
        return {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def ranks(self) -> list:
        """The PIDs of torchrun's children (its ranks)."""
        out = []
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                    out.append(int(entry))
        return out

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        ranks = self.ranks()
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if not ranks and self.proc.poll() is None:  # not started yet: nothing to checkpoint
            self.kill()
        if self.received is None:
            self.received = name
            again = "; a second Ctrl-C stops them at once" if signum == signal.SIGINT else ""
            print(f"cascade: {name}: the {len(ranks)} ranks checkpoint the step in flight and "
                  f"stop (waiting up to {self.grace_s:.0f} s{again})", file=sys.stderr,
                  flush=True)
            self._timer = threading.Timer(self.grace_s, self.kill)
            self._timer.daemon = True
            self._timer.start()

    def kill(self) -> None:
        """SIGKILL the ranks (each in its own session, with whatever it started) and torchrun."""
        self.killed = True
        self._gone = self.ranks()
        for pid in [*self._gone, self.proc.pid]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def wait(self) -> int:
        try:
            code = self.proc.wait()
        finally:
            if self._timer is not None:
                self._timer.cancel()
        deadline = time.time() + 30  # killed ranks gone too (what they held is then free)
        while self.killed and time.time() < deadline and any(
                _running(pid) for pid in getattr(self, "_gone", ())):
            time.sleep(0.05)
        return code


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def launch(config: str, overrides, nproc_per_node: int, nnodes: int = 1,
           rdzv_endpoint: str = "127.0.0.1:29500", grace_s: float = 600.0) -> tuple:
    """Run the ranks to the end: (torchrun's exit status, the stop signal forwarded or None,
    whether the grace time ran out and they were killed). Each rank gets an equal share of this
    node's cores (OMP_NUM_THREADS) unless the caller set it."""
    env = {**os.environ, "CASCADE_CHILD": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, Forwarder.SIGNALS)  # none lost meanwhile
    try:
        proc = subprocess.Popen(command(config, overrides, nproc_per_node, nnodes,
                                        rdzv_endpoint), env=env, preexec_fn=_child_setup,
                                start_new_session=True)
        forwarder = Forwarder(proc, grace_s)
        previous = forwarder.install()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        code = forwarder.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, forwarder.received, forwarder.killed


def _child_setup() -> None:
    """In torchrun, before it runs: the signals the launcher blocked while starting it are
    unblocked, and it dies with the launcher."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, Forwarder.SIGNALS)
    die_with_parent()
