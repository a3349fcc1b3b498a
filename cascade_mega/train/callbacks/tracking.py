"""MLflow tracking, off the training thread.

The logging rank (last pipeline stage, where the loss lives; first tensor-, context- and
data-parallel rank, since their metrics are already reduced) runs this callback. The step only
appends to memory; a background thread sends metrics with `log_batch` (at most one request a
second) and uploads artifacts, so the step never waits on the tracking store.

- One MLflow run per run directory: its id is kept in `<run_dir>/mlflow_run_id`, so a resumed or
  requeued run appends to the same MLflow run on the same step axis; each restart bumps the
  `cascade.restarts` tag and logs the `restarts` metric at the step it resumed from.
- Parameters: the resolved config, the code (git commit, dirty flag) and versions; tags: the
  parallel layout, host and Slurm job, the sweep group, the parent run.
- Artifacts: config.yaml, the checkpoint manifest after each checkpoint, and what other
  callbacks hand to `artifact()`: sample generations (`samples.py`) and loss curves (`plots.py`).
- A store that does not answer: one warning, metrics stay buffered (at most
  `tracking.max_buffer`, then the newest are dropped with a second warning) and go out when it
  answers again. At the end the run waits `tracking.flush_timeout` seconds for it, then writes what
  is left to `<run_dir>/mlflow_unsent.jsonl`, which the next start sends first.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import threading
import time

from cascade_mega.tracking import params, store
from cascade_mega.train.callbacks.base import Callback

RUN_ID_FILE = "mlflow_run_id"
UNSENT_FILE = "mlflow_unsent.jsonl"
STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}


class MlflowTracker(Callback):
    def __init__(self, cfg, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.uri = store.resolve_uri(cfg)
        self.max_buffer = cfg.tracking.max_buffer
        self.metrics: collections.deque = collections.deque()  # (key, value, ms, step)
        self.lock = threading.Lock()
        self.jobs: collections.deque = collections.deque()  # (artifact path, bytes)
        self.wake, self.stop = threading.Event(), threading.Event()
        self.thread = None
        self.run_id = None
        self.failing = False  # the store stopped answering (warned once)
        self.dropped = 0
        self.final_status = "FINISHED"
        self.step_times: list = []
        self.gave_up = False  # the store refused the run itself: keep metrics locally only

    # ------------------------------------------------------------------ training thread
    def on_train_start(self, trainer):
        store.configure_http()
        self.start_step = trainer.start_step
        self.run_params = {**params.config_params(self.cfg), **params.code_version(),
                           **params.versions()}
        self.tags = {**params.layout_tags(trainer), **self.cfg.tracking.tags}
        self._replay_unsent()
        from cascade_mega.config import record_yaml

        self.jobs.append(("config.yaml", record_yaml(self.cfg).encode()))
        self.thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self.thread.start()

    def _add(self, step: int, metrics: dict, prefix: str = ""):
        now = int(time.time() * 1000)
        with self.lock:
            for key, value in metrics.items():
                if len(self.metrics) >= self.max_buffer:
                    self.dropped += 1
                    continue
                self.metrics.append((prefix + key, float(value), now, step))
        if self.dropped == 1:
            store.warn(f"tracking buffer full ({self.max_buffer} metrics): newer metrics are "
                       "dropped until the store answers")
            self.dropped += 1  # warn once

    def on_step_end(self, trainer, step, metrics):
        self._add(step, metrics)
        if "step_time" in metrics:
            self.step_times.append(metrics["step_time"])

    def on_eval_end(self, trainer, step, metrics):
        self._add(step, metrics, "valid/")

    def artifact(self, name: str, body: bytes) -> None:
        """Upload `body` as artifact `name` (a path in the run), from the tracking thread."""
        self.jobs.append((name, body))

    def on_checkpoint_end(self, trainer, step, path):
        from cascade_mega.train import checkpoint

        body = json.dumps(checkpoint.manifest(os.path.dirname(path)), indent=1).encode()
        self.jobs.append(("checkpoints/manifest.json", body))

    def on_train_end(self, trainer):
        outcome = getattr(trainer, "outcome", "failed")
        self.final_status = STATUS[outcome]
        times = self.step_times
        if outcome == "finished":
            summary = {"summary/train_steps": trainer.step - trainer.start_step}
            if times:
                summary["summary/step_time_median"] = sorted(times)[len(times) // 2]
                summary["summary/tokens_per_s"] = (self.cfg.train.global_batch_size *
                                                   self.cfg.data.seq_len /
                                                   summary["summary/step_time_median"])
            self._add(trainer.step, summary)
        self.stop.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(self.cfg.tracking.flush_timeout + 15)
        self._write_unsent()

    def _replay_unsent(self):
        path = os.path.join(self.run_dir, UNSENT_FILE)
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        self.metrics.append(tuple(json.loads(line)))
                    except json.JSONDecodeError:
                        continue
            os.remove(path)

    def _write_unsent(self):
        with self.lock:
            left = list(self.metrics)
        if left:
            with open(os.path.join(self.run_dir, UNSENT_FILE), "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in left)
            store.warn(f"{len(left)} metrics not sent to {self.uri}; kept in "
                       f"{UNSENT_FILE}, the next start of this run sends them")

    # ------------------------------------------------------------------ tracking thread
    def _open_run(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        id_file = os.path.join(self.run_dir, RUN_ID_FILE)
        run = None
        if os.path.exists(id_file):
            run = self._existing_run(client, open(id_file).read().strip())
        if run is not None:
            self.run_id = run.info.run_id
            restarts = int(run.data.tags.get("cascade.restarts", "0")) + 1
            client.update_run(self.run_id, status="RUNNING")
            client.set_tag(self.run_id, "cascade.restarts", str(restarts))
            client.set_tag(self.run_id, "cascade.resumed_from_step", str(self.start_step))
            self._add(self.start_step, {"restarts": restarts})
        else:
            t = self.cfg.tracking
            tags = {"cascade.run_dir": os.path.abspath(self.run_dir), "cascade.restarts": "0"}
            if "code.git_commit" in self.run_params:
                tags["mlflow.source.git.commit"] = self.run_params["code.git_commit"]
            if t.group:
                tags["cascade.group"] = t.group
            if t.parent_run_id:
                tags["mlflow.parentRunId"] = t.parent_run_id
            run = client.create_run(store.experiment_id(client, t.experiment),
                                    run_name=t.run_name or self.cfg.name, tags=tags)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in self.run_params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100])
            tmp = f"{id_file}.tmp"
            with open(tmp, "w") as f:
                f.write(self.run_id)
            os.replace(tmp, id_file)
        from mlflow.entities import RunTag

        client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in self.tags.items()])
        return client

    def _existing_run(self, client, run_id: str):
        from mlflow.exceptions import RestException

        try:
            run = client.get_run(run_id)
        except RestException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            store.warn(f"MLflow run {run_id} of {self.run_dir} is gone from {self.uri}; "
                       "this run starts a new one")
            return None
        return run

    def _send(self, client):
        from mlflow.entities import Metric

        while self.jobs:
            name, body = self.jobs[0]
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, os.path.basename(name))
                with open(path, "wb") as f:
                    f.write(body)
                client.log_artifact(self.run_id, path, os.path.dirname(name) or None)
            self.jobs.popleft()
        while self.metrics:
            with self.lock:
                chunk = [self.metrics[i] for i in range(min(1000, len(self.metrics)))]
            client.log_batch(self.run_id, metrics=[Metric(*m) for m in chunk])
            with self.lock:
                for _ in chunk:
                    self.metrics.popleft()

    def _worker(self):
        client, deadline = None, None
        while True:
            stopping = self.stop.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + self.cfg.tracking.flush_timeout
            try:
                if client is None:
                    client = self._open_run()
                self._send(client)
                if self.failing:
                    self.failing = False
                    store.warn(f"tracking store {self.uri} answers again; buffered metrics sent")
            except Exception as err:  # noqa: BLE001  the store is down or refused something
                self._failed(err, opened=client is not None)
            if self.gave_up or stopping and (client is not None and not self.metrics and
                                             not self.jobs or time.monotonic() > deadline):
                if client is not None:
                    try:
                        client.set_terminated(self.run_id, self.final_status)
                    except Exception as err:  # noqa: BLE001
                        self._failed(err, opened=True)
                return
            self.wake.wait(0.2 if stopping else 1.0)
            self.wake.clear()

    def _failed(self, err, opened: bool):
        if store.unreachable(err):
            if not self.failing:
                self.failing = True
                store.warn(f"tracking store {self.uri} does not answer ({type(err).__name__}); "
                           "training continues, metrics are buffered")
            return
        reason = str(err).strip().splitlines()[0]
        if not opened:  # it refuses the run itself: stop trying, keep the metrics on disk
            store.warn(f"tracking store {self.uri} refused the run ({reason}); metrics stay in "
                       f"{UNSENT_FILE} and metrics.jsonl")
            self.gave_up = True
            return
        # it refused one update: drop that rather than retry it forever
        store.warn(f"tracking store {self.uri} refused an update: {reason}")
        if self.jobs:
            self.jobs.popleft()
        else:
            with self.lock:
                for _ in range(min(1000, len(self.metrics))):
                    self.metrics.popleft()
