"""MLflow tracking off the training thread.

Metrics go into a bounded queue; a background thread sends them with `log_batch` (one request per
second at most), so the step never waits on the tracking server. The default store is sqlite in the
run directory; the MLflow run id is kept in `<run_dir>/mlflow_run_id` so a resumed run appends to
the same MLflow run. If the server cannot be reached, training goes on: one warning, metrics stay
buffered (up to `max_buffer`) and are sent when it answers again.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker:
    def __init__(self, cfg, run_dir: str, max_buffer: int = 100_000):
        self.cfg, self.run_dir = cfg, run_dir
        self.uri = cfg.tracking.uri or f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db"
        self.queue: "queue.Queue" = queue.Queue(maxsize=max_buffer)
        self.thread = None
        self.run_id = None
        self._warned = False
        self._stop = threading.Event()

    def _warn(self, err):
        if not self._warned:
            warnings.warn(f"MLflow tracking at {self.uri} unavailable ({err}); "
                          "training continues and metrics are buffered", stacklevel=2)
            self._warned = True

    def on_train_start(self, trainer):
        from omegaconf import OmegaConf

        params = _flatten(OmegaConf.to_container(OmegaConf.structured(self.cfg)))
        params.update({"parallel.world_size": trainer.world_size, "start_step": trainer.start_step})
        self.thread = threading.Thread(target=self._worker, args=(params,), daemon=True)
        self.thread.start()

    def _open_run(self, params):
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        client = MlflowClient(self.uri)
        id_file = os.path.join(self.run_dir, "mlflow_run_id")
        if os.path.exists(id_file):
            self.run_id = open(id_file).read().strip()
            client.set_tag(self.run_id, "resumed_from_step", str(params["start_step"]))
            return client
        exp = client.get_experiment_by_name(self.cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else \
            client.create_experiment(self.cfg.tracking.experiment)
        run = client.create_run(exp_id, run_name=self.cfg.tracking.run_name or self.cfg.name)
        self.run_id = run.info.run_id
        with open(id_file, "w") as f:
            f.write(self.run_id)
        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i:i + 100])
        return client

    def _worker(self, params):
        from mlflow.entities import Metric

        client, pending = None, []
        while True:
            stopping = self._stop.is_set()
            try:
                while True:
                    pending.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            try:
                if client is None:
                    client = self._open_run(params)
                while pending:
                    chunk = pending[:1000]
                    client.log_batch(self.run_id, metrics=[Metric(*m) for m in chunk])
                    del pending[:len(chunk)]
            except Exception as err:  # server down: keep buffering, retry later
                self._warn(err)
                if stopping:
                    return
            if stopping:
                if client is not None and not pending:
                    try:
                        client.set_terminated(self.run_id, "FINISHED")
                    except Exception as err:
                        self._warn(err)
                return
            self._stop.wait(1.0)

    def _put(self, step, split, metrics):
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            name = k if split == "train" else f"{split}/{k}"
            try:
                self.queue.put_nowait((name, float(v), now, step))
            except queue.Full:
                self._warn("metric buffer full; dropping newest metrics")

    def on_step_end(self, trainer, step, metrics):
        self._put(step, "train", metrics)

    def on_eval_end(self, trainer, step, metrics):
        self._put(step, "valid", metrics)

    def on_train_end(self, trainer):
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
