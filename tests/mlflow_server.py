"""A real `mlflow server` (or `mlflow ui`) for tests: loopback port, one worker, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root, port=None, command="server", backend=None):
        self.root, self.port = str(root), port or free_port()
        self.command = command
        self.backend = backend or f"sqlite:///{self.root}/store.db"
        self.proc = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        os.makedirs(self.root, exist_ok=True)
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        cmd = [mlflow, self.command, "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", self.backend]
        if self.command == "server":
            cmd += ["--artifacts-destination", f"{self.root}/artifacts"]
        # own process group: the server's worker processes are stopped with it
        self.proc = subprocess.Popen(cmd, stdout=open(f"{self.root}/server.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow {self.command} exited; see {self.root}/server.log")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow {self.command} did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started, by its leader's PID
        self.proc.wait(timeout=30)
