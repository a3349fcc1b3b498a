"""`cascade runs [EXPERIMENT]`: the tracked runs as a table of their key final metrics.

Reads MLflow: `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else every run directory's own sqlite
store under `--root` (the default store of a run is `<run_dir>/mlflow.db`).
"""

from __future__ import annotations

import glob
import json
import os
import time

COLUMNS = [("run", 24), ("status", 9), ("step", 7), ("loss", 8), ("valid/nelbo", 11),
           ("valid/ppl_bound", 15), ("tokens_per_s", 12), ("restarts", 8), ("started", 16)]


def add_arguments(p) -> None:
    p.add_argument("experiment", nargs="?", help="experiment name (default: all)")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the "
                                          "run directories' sqlite stores under --root)")
    p.add_argument("--root", default="runs", help="where run directories live (default: runs)")
    p.add_argument("--group", help="only runs of this sweep group (tag cascade.group)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")


def stores(args) -> list:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return [uri]
    found = sorted(glob.glob(os.path.join(args.root, "**", "mlflow.db"), recursive=True))
    return [f"sqlite:///{os.path.abspath(p)}" for p in found]


def rows(uri: str, experiment=None, group=None) -> list:
    from mlflow.tracking import MlflowClient

    from cascade_mega.config import ConfigError
    from cascade_mega.tracking import store

    store.check_uri(uri)
    store.configure_http()
    client = MlflowClient(uri)
    try:
        exps = client.search_experiments()
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot read tracking store {uri}: "
                          f"{str(err).strip().splitlines()[0]}") from None
    ids = [e.experiment_id for e in exps if experiment in (None, e.name)]
    if not ids:
        return []
    query = f"tags.`cascade.group` = '{group}'" if group else ""
    out = []
    for run in client.search_runs(ids, query, order_by=["attributes.start_time ASC"]):
        m, tags = run.data.metrics, run.data.tags
        history = client.get_metric_history(run.info.run_id, "loss")
        out.append({
            "run": run.info.run_name, "status": run.info.status,
            "step": max((h.step for h in history), default=None),
            "loss": m.get("loss"), "valid/nelbo": m.get("valid/nelbo"),
            "valid/ppl_bound": m.get("valid/ppl_bound"),
            "tokens_per_s": m.get("summary/tokens_per_s", m.get("tokens_per_s")),
            "restarts": int(tags.get("cascade.restarts", 0)),
            "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1e3)),
            "run_id": run.info.run_id, "run_dir": tags.get("cascade.run_dir"), "store": uri,
        })
    return out


def _cell(value, width):
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    else:
        text = str(value)
    return text[:width].ljust(width)


def run(args) -> int:
    from cascade_mega.config import ConfigError

    uris = stores(args)
    if not uris:
        raise ConfigError(f"no tracking store: no run directory with mlflow.db under "
                          f"{args.root!r}, and neither --tracking-uri nor MLFLOW_TRACKING_URI")
    table = [r for uri in uris for r in rows(uri, args.experiment, args.group)]
    if args.json:
        for r in table:
            print(json.dumps(r))
        return 0
    print("  ".join(name.ljust(width) for name, width in COLUMNS))
    for r in table:
        print("  ".join(_cell(r[name], width) for name, width in COLUMNS))
    if not table:
        print(f"(no runs{' in experiment ' + repr(args.experiment) if args.experiment else ''})")
    return 0
