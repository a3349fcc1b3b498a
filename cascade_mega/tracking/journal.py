"""What the tracker has to send, on disk first: metrics and artifacts survive a kill -9.

A metric goes to `<run_dir>/mlflow_journal.jsonl` (one `[key, value, ms, step]` line, flushed)
before anything tries to send it; the sender reads the journal from the offset the store last
acknowledged, which `mlflow_journal.acked` keeps (`{"offset": bytes, "upto": {key: step}}`,
replaced atomically after each batch the store took). The next start of the run sends whatever
lies after that offset first. Two things make that exact:

- a line sent but not yet acknowledged when the process died is sent again with its original
  timestamp, and MLflow's stores ignore a metric identical in key, value, timestamp and step, so
  it is not held twice;
- the steps a resume runs again (those after its checkpoint) are not sent again: `upto` holds
  the newest step journaled for each key, and a metric at or before it is skipped (MLflow cannot
  delete a value, so the first one stays; a resume reproduces it anyway).

The journal is cut back to nothing whenever the store holds all of it, so it stays small while
the store answers; while it does not, at most `tracking.max_buffer` metrics wait (then the newest
are dropped, with a warning). Artifacts are files under `mlflow_pending/<seq>/<name>` until sent.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

JOURNAL = "mlflow_journal.jsonl"
ACKED = "mlflow_journal.acked"
PENDING = "mlflow_pending"
LEGACY_UNSENT = "mlflow_unsent.jsonl"  # what runs of earlier versions left unsent
EVENTS = ("restarts",)  # logged once per start at the resumed step: never a re-run step
CHUNK = 1000  # metrics per request (MLflow's log_batch limit)


class Journal:
    def __init__(self, run_dir: str, max_pending: int):
        self.run_dir, self.max_pending = run_dir, max_pending
        self.path = os.path.join(run_dir, JOURNAL)
        self.acked_path = os.path.join(run_dir, ACKED)
        self.spool = os.path.join(run_dir, PENDING)
        self.lock = threading.Lock()
        self.offset, self.upto, self.pending, self.dropped = 0, {}, 0, 0
        self.writer = None
        self.seq = 0

    # ------------------------------------------------------------------ start
    def open(self, fresh: bool) -> None:
        """Read what the last process left (fresh: a run started over, nothing of it counts)."""
        if fresh:
            self.reset()
        os.makedirs(self.run_dir, exist_ok=True)
        if os.path.isfile(self.acked_path):
            try:
                with open(self.acked_path) as f:
                    state = json.load(f)
                self.offset, self.upto = int(state["offset"]), dict(state["upto"])
            except (OSError, ValueError, KeyError, TypeError):
                self.offset, self.upto = 0, {}  # unreadable: resend all (idempotent)
        size = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
        if self.offset > size:  # the journal was cut back and the process died before the ack
            self.offset = 0
        whole = self._cut_partial_line(size)
        for record in self._records(self.offset, whole):
            self.pending += 1
            self._raise_upto(record)
        self.writer = open(self.path, "ab")
        legacy = os.path.join(self.run_dir, LEGACY_UNSENT)
        if os.path.isfile(legacy):
            with open(legacy) as f:
                records = [tuple(json.loads(line)) for line in f if line.strip()]
            self.append(records, dedup=False)
            os.remove(legacy)
        if os.path.isdir(self.spool):
            self.seq = max((int(n) for n in os.listdir(self.spool) if n.isdigit()), default=0)
            for name in os.listdir(self.spool):  # left by a kill: half spooled, half removed
                if not name.isdigit():
                    shutil.rmtree(os.path.join(self.spool, name), ignore_errors=True)

    def reset(self) -> None:
        for path in (self.path, self.acked_path):
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(self.spool, ignore_errors=True)

    def _cut_partial_line(self, size: int) -> int:
        """A line the kill cut short is dropped (it was never sent); returns the whole size."""
        if not size:
            return 0
        with open(self.path, "rb+") as f:
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return size
            f.seek(0)
            data = f.read()
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
            return keep

    def _records(self, start: int, end: int):
        if end <= start:
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            for line in f.read(end - start).splitlines():
                try:
                    yield tuple(json.loads(line))
                except ValueError:
                    continue

    def _raise_upto(self, record) -> None:
        key, step = record[0], record[3]
        if key not in EVENTS and step > self.upto.get(key, -1):
            self.upto[key] = step

    # ------------------------------------------------------------------ training thread
    def append(self, records, dedup: bool = True) -> None:
        """Journal (key, value, ms, step) records; a step the store holds already is skipped."""
        with self.lock:
            lines = []
            for record in records:
                key, step = record[0], record[3]
                if dedup and key not in EVENTS and step <= self.upto.get(key, -1):
                    continue
                if self.pending >= self.max_pending:
                    self.dropped += 1
                    continue
                self.pending += 1
                self._raise_upto(record)
                lines.append(json.dumps(list(record)) + "\n")
            if lines:
                self.writer.write("".join(lines).encode())
                self.writer.flush()

    def put_artifact(self, name: str, body: bytes) -> None:
        """Spool artifact `name` (a path in the run) until the sender has uploaded it."""
        with self.lock:
            self.seq += 1
            seq = f"{self.seq:08d}"
        tmp = os.path.join(self.spool, seq + ".tmp")
        os.makedirs(os.path.join(tmp, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(body)
        os.replace(tmp, os.path.join(self.spool, seq))

    # ------------------------------------------------------------------ sending thread
    def artifacts(self) -> list:
        """(spool folder, artifact name) of every artifact not uploaded yet, oldest first."""
        if not os.path.isdir(self.spool):
            return []
        out = []
        for seq in sorted(n for n in os.listdir(self.spool) if n.isdigit()):
            folder = os.path.join(self.spool, seq)
            files = [(folder, os.path.relpath(os.path.join(root, n), folder))
                     for root, _, names in os.walk(folder) for n in names]
            if not files:  # emptied by a kill inside an earlier removal: nothing left to send
                shutil.rmtree(folder, ignore_errors=True)
            out += files
        return out

    def artifact_done(self, folder: str) -> None:
        """Sent: renamed first (one atomic step), so a kill inside the removal never leaves an
        emptied folder that looks like an artifact still to send."""
        gone = folder + ".sent"
        os.replace(folder, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def next_chunk(self):
        """(records, end offset) of the oldest metrics not acknowledged yet; ([], offset)."""
        with self.lock:
            if self.writer is not None:
                self.writer.flush()
            end = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
        records, stop = [], self.offset
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while len(records) < CHUNK:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                stop += len(line)
                try:
                    records.append(tuple(json.loads(line)))
                except ValueError:
                    continue
                if stop >= end:
                    break
        return records, stop

    def ack(self, records, end: int) -> None:
        """The store took `records`, which end at byte `end` of the journal.

        The state is replaced before the journal is cut back, and both under the lock (no line
        is journaled in between): a kill between the two leaves the whole journal with offset 0,
        which resends lines the store ignores as identical, never an empty journal beside an
        older `upto` (the steps a resume runs again would then be sent twice)."""
        with self.lock:
            self.offset = end
            self.pending = max(0, self.pending - len(records))
            cut = self.writer is not None and self.offset == os.path.getsize(self.path)
            if cut:  # all of it sent: cut it back
                self.offset = 0
            tmp = self.acked_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps({"offset": self.offset, "upto": self.upto}))
            os.replace(tmp, self.acked_path)
            if cut:
                self.writer.truncate(0)
                self.writer.seek(0)

    def close(self) -> None:
        with self.lock:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
