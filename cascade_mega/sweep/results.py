"""A sweep's final evaluation losses, read back from MLflow.

Every run the sweep file expands to is looked up by name among the MLflow runs tagged with the
sweep's group. A run counts when it FINISHED with a final `valid/nelbo_common` (nats per token on
the targets every objective predicts, `objective.common_targets`: the NLL for AR, the NELBO bound
otherwise, so that shifted-prediction and document-masked runs compare like with like); a sweep
with a run that predates that metric is read on `valid/nelbo` throughout. Any other run is a
failure named with its reason (its MLflow status, else what its run directory says:
`exit.json`, or the last line of its log).
"""

from __future__ import annotations

import json
import os
from typing import List, Tuple

from cascade_mega.config import ConfigError
from cascade_mega.sweep.spec import Run, Sweep

METRIC = "valid/nelbo_common"
FALLBACK = "valid/nelbo"  # runs made before the common-target bound


def tracked(sweep: Sweep) -> dict:
    """run name -> (status, final valid/nelbo or None), from the sweep's store and group."""
    from mlflow.tracking import MlflowClient

    from cascade_mega.tracking import store

    store.check_uri(sweep.uri)
    if sweep.uri.startswith("sqlite:///") and not os.path.isfile(sweep.uri[len("sqlite:///"):]):
        return {}  # no run has tracked to it yet (opening it would create it)
    store.configure_http()
    client = MlflowClient(sweep.uri)
    try:
        exp = client.get_experiment_by_name(sweep.experiment or sweep.name)
        if exp is None:
            return {}
        found = client.search_runs([exp.experiment_id],
                                   f"tags.`cascade.group` = '{sweep.name}'",
                                   order_by=["attributes.start_time ASC"])
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot read the sweep's tracking store {sweep.uri}: "
                          f"{str(err).strip().splitlines()[0]}") from None
    runs = [r for r in found if r.data.tags.get("cascade.sweep") != "parent"]
    have = [r.data.metrics for r in runs if FALLBACK in r.data.metrics]
    key = METRIC if all(METRIC in m for m in have) else FALLBACK  # one metric for the sweep
    return {r.info.run_name: (r.info.status, r.data.metrics.get(key)) for r in runs}


def _why(run: Run, status: str | None) -> str:
    run_dir = run.cfg.run_dir
    if status and status != "FINISHED":
        reason = f"MLflow status {status}"
    elif status == "FINISHED":
        reason = f"finished without a final {METRIC} (train.eval_batches = 0?)"
    else:
        reason = "not in the tracking store"
    exit_path = os.path.join(run_dir, "exit.json")
    if os.path.exists(exit_path):
        with open(exit_path) as f:
            rec = json.load(f)
        reason += f"; exit.json: {rec.get('outcome')} at step {rec.get('step')}"
    elif not os.path.isdir(run_dir):
        reason += "; never started"
    log = os.path.join(run_dir, "sweep.log")
    if os.path.exists(log):
        with open(log) as f:
            errors = [ln for ln in f.read().splitlines() if "error" in ln.lower()]
        if errors:
            reason += f"; {errors[-1].strip()}"
    return reason


def collect(sweep: Sweep, runs: List[Run]) -> Tuple[List[dict], List[dict]]:
    """(results of the runs that finished, failures with their reason)."""
    seen = tracked(sweep)
    results, failures = [], []
    for run in runs:
        status, loss = seen.get(run.name, (None, None))
        if status == "FINISHED" and loss is not None:
            results.append({"run": run.name, "label": run.label, "params": run.params,
                            "tokens": run.tokens, "flops": run.flops, "loss": loss,
                            "block_size": run.point["block_size"], **{
                                k: run.point[k] for k in ("depth", "width", "lr", "experts",
                                                          "top_k")}})
        else:
            failures.append({"run": run.name, "label": run.label, "reason": _why(run, status)})
    return results, failures
