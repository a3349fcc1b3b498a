"""The run-directory lock on its own (`train/run_lock.py`): who may take a lock another trainer
left, by host, PID, Slurm job and heartbeat age (the two-trainer run is in test_torchrun)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cascade_mega.train.run_lock import NAME, RunDirInUse, RunLock


def _leave(run_dir, **held):
    run_dir.mkdir(exist_ok=True)
    (run_dir / NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": 1,
                                            "job": None, "beat": time.time(), **held}))


def test_a_live_holder_keeps_it_and_a_gone_one_is_taken_over(tmp_path, monkeypatch, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        _leave(run, pid=sleeper.pid)  # this host, a live process: refused
        with pytest.raises(RunDirInUse, match=f"on {socket.gethostname()} \\(PID {sleeper.pid}"):
            RunLock(str(run)).acquire()
        _leave(run, host="node-b", pid=4242, job="77")  # another host, fresh: refused
        with pytest.raises(RunDirInUse, match="node-b .PID 4242, Slurm job 77; heartbeat 0 s"):
            RunLock(str(run)).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued: taken over
        RunLock(str(run)).acquire().release()
        monkeypatch.delenv("SLURM_JOB_ID")
        _leave(run, host="node-b", pid=4242, beat=time.time() - 120)  # stale: taken over
        RunLock(str(run), stale_after=60).acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()
    _leave(run, pid=sleeper.pid)  # this host, the process gone: taken over at once
    lock = RunLock(str(run), interval=0.1).acquire()
    first = json.loads((run / NAME).read_text())
    time.sleep(0.5)
    assert first["pid"] == os.getpid() and json.loads((run / NAME).read_text())["beat"] > \
        first["beat"]  # the holder keeps its heartbeat fresh
    lock.release()
    assert not (run / NAME).exists()
    assert capsys.readouterr().err.count("taking over the lock") == 3


def test_a_lock_that_made_the_run_directory_removes_it_when_nothing_else_was_written(tmp_path):
    fresh = tmp_path / "fresh"
    RunLock(str(fresh)).acquire().release()
    assert not fresh.exists()  # it made the directory and nothing else wrote there
