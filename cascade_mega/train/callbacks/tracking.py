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
- Nothing is lost to a kill -9: every metric and artifact is on disk (`tracking/journal.py`)
  before it is sent, what the store has not acknowledged is sent by the next start of the run,
  and the steps a resume runs again are not sent twice.
- A store that does not answer: one warning, metrics wait in the journal (at most
  `tracking.max_buffer`, then the newest are dropped with a second warning) and go out when it
  answers again. At the end the run waits `tracking.flush_timeout` seconds for it; what is left
  stays in the journal for the next start.
"""

from __future__ import annotations

import json
import os
import threading
import time

from cascade_mega.tracking import params, store
from cascade_mega.tracking.journal import JOURNAL, Journal
from cascade_mega.train.callbacks.base import Callback

RUN_ID_FILE = "mlflow_run_id"
STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}


class MlflowTracker(Callback):
    def __init__(self, cfg, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.uri = store.resolve_uri(cfg)
        self.journal = Journal(run_dir, cfg.tracking.max_buffer)
        self.wake, self.stop = threading.Event(), threading.Event()
        self.thread = None
        self.run_id = None
        self.failing = False  # the store stopped answering (warned once)
        self.warned_full = False
        self.final_status = "FINISHED"
        self.step_times: list = []
        self.gave_up = False  # the store refused the run itself: keep metrics locally only
        self.current = None  # what the sender is sending: ("artifact", folder) or metrics

    # ------------------------------------------------------------------ training thread
    def on_train_start(self, trainer):
        store.configure_http()
        self.start_step = trainer.start_step
        # a start from step 0 is a new attempt, a new MLflow run: the trainer moved the earlier
        # attempt's run id and journal aside (`train/attempts.py`)
        fresh = trainer.start_step == 0
        self.journal.open(fresh)
        self.run_params = {**params.config_params(self.cfg), **params.code_version(),
                           **params.versions()}
        self.tags = {**params.layout_tags(trainer), **self.cfg.tracking.tags}
        changes = getattr(trainer, "resume_changes", [])
        if changes:  # params are immutable: a resume's changes (e.g. the learning rate) are tags
            self.tags[f"cascade.changed_at_step.{trainer.start_step}"] = "; ".join(
                f"{key} {old!r} -> {new!r}" for key, old, new in changes)[:5000]
        from cascade_mega.config import record_yaml

        self.artifact("config.yaml", record_yaml(self.cfg).encode())
        self.thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self.thread.start()

    def _add(self, step: int, metrics: dict, prefix: str = ""):
        now = int(time.time() * 1000)
        self.journal.append([(prefix + key, float(value), now, step)
                             for key, value in metrics.items()])
        if self.journal.dropped and not self.warned_full:
            self.warned_full = True
            store.warn(f"tracking buffer full ({self.cfg.tracking.max_buffer} metrics): newer "
                       "metrics are dropped until the store answers")

    def on_step_end(self, trainer, step, metrics):
        self._add(step, metrics)
        if "step_time" in metrics:
            self.step_times.append(metrics["step_time"])

    def on_eval_end(self, trainer, step, metrics):
        self._add(step, metrics, "valid/")

    def artifact(self, name: str, body: bytes) -> None:
        """Upload `body` as artifact `name` (a path in the run), from the tracking thread."""
        self.journal.put_artifact(name, body)

    def on_checkpoint_end(self, trainer, step, path):
        from cascade_mega import checkpoint

        body = json.dumps(checkpoint.listing(os.path.dirname(path)), indent=1).encode()
        self.artifact("checkpoints/manifest.json", body)

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
        self.journal.close()
        if self.journal.pending:
            store.warn(f"{self.journal.pending} metrics not sent to {self.uri}; kept in "
                       f"{JOURNAL}, the next start of this run sends them")

    # ------------------------------------------------------------------ tracking thread
    def _open_run(self):
        from mlflow.tracking import MlflowClient

        store.ensure_sqlite(self.uri)
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
            previous = self._previous_attempt()
            if previous:
                tags["cascade.previous_attempt"] = previous
            run = client.create_run(store.experiment_id(client, t.experiment),
                                    run_name=t.run_name or self.cfg.name, tags=tags)
            self.run_id = run.info.run_id
            if previous:
                self._close_previous(client, previous)
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

    def _previous_attempt(self):
        """The MLflow run of the attempt this start from step 0 set aside, if it had one."""
        from cascade_mega.train import attempts

        folder = attempts.latest_archive(self.run_dir) if self.start_step == 0 else None
        path = os.path.join(folder, RUN_ID_FILE) if folder else None
        return open(path).read().strip() if path and os.path.isfile(path) else None

    def _close_previous(self, client, run_id: str) -> None:
        """The earlier attempt's run points at this one, and is KILLED if it was left RUNNING."""
        try:
            client.set_tag(run_id, "cascade.next_attempt", self.run_id)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except Exception as err:  # another store, or the run deleted: this run goes on
            store.warn(f"the earlier attempt's MLflow run {run_id} was not updated ({err})")

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

        for folder, name in self.journal.artifacts():
            self.current = ("artifact", folder)
            client.log_artifact(self.run_id, os.path.join(folder, name),
                                os.path.dirname(name) or None)
            self.journal.artifact_done(folder)
        while True:
            records, end = self.journal.next_chunk()
            if not records:
                return
            self.current = ("metrics", records, end)
            client.log_batch(self.run_id, metrics=[Metric(*m) for m in records])
            self.journal.ack(records, end)

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
            if self.gave_up or stopping and (client is not None and not self.journal.pending
                                             and not self.journal.artifacts()
                                             or time.monotonic() > deadline):
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
                       f"{JOURNAL} and metrics.jsonl")
            self.gave_up = True
            return
        # it refused one update: drop that rather than retry it forever
        store.warn(f"tracking store {self.uri} refused an update: {reason}")
        if self.current[0] == "artifact":
            self.journal.artifact_done(self.current[1])
        else:
            self.journal.ack(*self.current[1:])
