"""Where runs are tracked: the URI, its start-up check, and how the MLflow client talks to it.

- Default URI: a sqlite store in the run directory (`sqlite:///<run_dir>/mlflow.db`), so nothing
  needs a server; `mlflow ui --backend-store-uri` on it shows the run.
- The start-up check (`preflight`) runs before any model is built: a malformed URI, or an
  experiment the server refuses (deleted, invalid name), is a `ConfigError` (a sqlite store that
  does not exist yet is not created by the check); a server that does
  not answer is a warning only, since training must not depend on it (metrics are buffered).
- The HTTP client gets no retries and a short timeout (`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`,
  `MLFLOW_HTTP_REQUEST_TIMEOUT=10`, unless the user set them): MLflow's default backoff waits
  minutes on a dead server; the tracker retries on its own schedule instead.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlparse

from cascade_mega.config import ConfigError

DATABASES = ("postgresql", "mysql", "mssql")


def warn(message: str) -> None:
    """A tracking problem the run survives: one line on stderr (not a Python warning, which the
    command line silences for megatron's sake)."""
    from cascade_mega.config import redact_uri

    print(f"cascade: warning: {redact_uri(message)}", file=sys.stderr, flush=True)


def resolve_uri(cfg) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{os.path.abspath(cfg.run_dir)}/mlflow.db"


def check_uri(uri: str) -> None:
    """Refuse URIs MLflow cannot track to, with one message naming `tracking.uri`."""
    parts = urlparse(uri)
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2://
    ok = (scheme in ("http", "https") and bool(parts.hostname)) or \
        (scheme == "sqlite" and parts.path not in ("", "/")) or \
        (scheme in DATABASES and bool(parts.netloc)) or scheme == "databricks"
    if ok and scheme in ("http", "https"):
        try:
            parts.port  # noqa: B018  (raises on a malformed port)
        except ValueError:
            ok = False
    if not ok:
        raise ConfigError(f"'tracking.uri' = {uri!r} is not a tracking store: expected "
                          "http(s)://HOST[:PORT], sqlite:///PATH or a database URL "
                          "(postgresql://, mysql://); MLflow 3 no longer develops file stores")


def configure_http() -> None:
    import logging

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports to the vendor
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow  # noqa: F401  (it sets its loggers up on import; quiet them after that)

    for name in ("mlflow", "alembic"):  # store set-up chatter on every new sqlite store
        logging.getLogger(name).setLevel(logging.WARNING)


def unreachable(err: BaseException) -> bool:
    """True when the store did not answer, or failed on its side (an HTTP 5xx: a server killed
    or restarting while it answered): worth retrying. False for a refusal (a 4xx), which a retry
    would only repeat."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    text = str(err)
    return isinstance(err, (ConnectionError, TimeoutError)) or any(
        s in text for s in ("Max retries exceeded", "Connection refused", "timed out",
                            "ConnectionError", "Failed to establish", "Read timed out",
                            # the server died while answering this request
                            "Connection aborted", "RemoteDisconnected", "Connection reset"))


def ensure_sqlite(uri: str) -> None:
    """Create a sqlite store that does not exist yet whole or not at all: MLflow builds its
    schema in a file of its own, which is then linked into place (`os.link` fails when another
    process got there first, whose store is then used). A process killed while MLflow creates
    the tables in place would leave a store that no later start can open."""
    if not uri.startswith("sqlite:"):
        return
    path = urlparse(uri).path
    if os.path.isfile(path):
        return
    from mlflow.tracking import MlflowClient

    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # what an earlier start killed mid-creation left
        if name.startswith(os.path.basename(path) + ".init-"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
    tmp = f"{path}.init-{os.getpid()}"
    try:
        MlflowClient(f"sqlite:///{tmp}").search_experiments()  # runs the schema migrations
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:  # also after a failure (a full disk): no temporary store is left behind
        for name in (tmp, tmp + "-journal"):
            if os.path.exists(name):
                os.remove(name)


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created when missing; ConfigError when it cannot be used."""
    if not name.strip():
        raise ConfigError("'tracking.experiment' is empty")
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise ConfigError(f"'tracking.experiment' = {name!r} is deleted in the tracking store: "
                          "restore it (mlflow experiments restore) or choose another name")
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))


def artifact_root(uri: str):
    """Where a new experiment keeps its artifacts: beside a sqlite store's file (MLflow's default
    is `./mlruns` in whatever directory the process started from); a server decides its own."""
    if urlparse(uri).scheme != "sqlite":
        return None
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else urlparse(uri).path
    return "file://" + os.path.join(os.path.dirname(os.path.abspath(path)), "mlartifacts")


def preflight(cfg) -> bool:
    """Check the tracking store before training. Returns False (after one warning) when it does
    not answer; raises ConfigError when the URI is malformed or the store refuses the experiment."""
    if not cfg.tracking.enabled:
        return True
    uri = resolve_uri(cfg)
    check_uri(uri)
    configure_http()
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:") and not os.path.isfile(urlparse(uri).path):
        return True  # a new local store: nothing to ask, and nothing is written before the
        # run's data and checkpoints are checked (the tracker creates it when training starts)
    try:
        experiment_id(MlflowClient(uri), cfg.tracking.experiment)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001  (MLflow raises many kinds)
        if unreachable(err):
            warn(f"tracking store {uri} does not answer; training starts anyway and buffers its "
                 "metrics until it does")
            return False
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(f"tracking store {uri} refuses experiment "
                          f"{cfg.tracking.experiment!r}: {reason}") from None
    return True
