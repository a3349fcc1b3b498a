"""Run in helper processes that must outlive the scheduler's stop signals (no heavy imports: a
spawned helper imports this module, and should start in a fraction of a second)."""

import signal

STOP = (signal.SIGTERM, signal.SIGUSR1)


def ignore() -> None:
    for sig in STOP:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP))
