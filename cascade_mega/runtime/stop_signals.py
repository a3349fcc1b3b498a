"""Run in helper processes that must outlive the scheduler's stop signals (no heavy imports: a
spawned helper imports this module, and should start in a fraction of a second), but not the
process that started them: a rank killed outright (SIGKILL, the OOM killer) takes its helpers
along (Linux's parent-death signal), instead of leaving them holding its files and pipes."""

import signal
import sys

STOP = (signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1


def ignore() -> None:
    for sig in STOP:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP))
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
