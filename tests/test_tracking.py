"""Tracking against a real MLflow server: params, metrics and artifacts read back with MlflowClient,
resume appends to the same run, a server killed mid-run loses nothing once it is back, and bad
tracking settings fail before training. (The default sqlite store in `mlflow ui`: test_cli.py.)"""

import json
import os
import time

import pytest
from mlflow.tracking import MlflowClient

import helpers
from mlflow_server import MlflowServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*helpers.TINY_MODEL, "train.micro_batch_size=4", "train.global_batch_size=4",
        "optimizer.warmup_steps=2", "train.steps=20", "train.log_interval=5", "train.eval_interval=10",
        "train.eval_batches=1", "checkpoint.interval=10"]


def cascade(*args, background=False):
    """Training runs in their own process here: the store must see a run end as a process
    ends (status, the final flush)."""
    return helpers.cascade(*args, process=True, background=background)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield srv
    srv.stop()


def _run_id(run_dir):
    return (run_dir / "mlflow_run_id").read_text().strip()


def _steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key),
                                   key=lambda m: (m.step, m.timestamp))]


def _artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_run_logs_params_metrics_and_artifacts(server, tmp_path):
    """A run stopped after step 10 (its MLflow run KILLED, to be resumed) and resumed to step
    20 appends to the same MLflow run, on one step axis; params, tags, metrics, artifacts and
    `cascade runs` read back."""
    run_dir = tmp_path / "run"
    args = ["train", "configs/base.yaml", *TINY, f"run_dir={run_dir}",
            f"tracking.uri={server.uri}", "tracking.experiment=readback",
            "tracking.tags.team=pretraining", "tracking.group=sweep-a"]
    assert cascade(*args, "train.exit_interval=10").returncode == 0
    client = MlflowClient(server.uri)
    run_id = _run_id(run_dir)
    assert client.get_run(run_id).info.status == "KILLED"  # stopped, to be resumed
    assert _steps(client, run_id, "loss") == [5, 10]
    proc = cascade(*args)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(server.uri)
    run = client.get_run(_run_id(run_dir))
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["cascade.restarts"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "restarts")] == \
        [(10, 1.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert client.get_experiment(run.info.experiment_id).name == "readback"
    p = run.data.params
    assert p["data.seq_len"] == "64" and p["diffusion.block_size"] == "8"
    assert len(p["code.git_commit"]) == 40 and p["code.git_dirty"] in ("True", "False")
    assert p["version.torch"].startswith("2.13") and p["version.megatron_core"] == "0.19.2"
    tags = run.data.tags
    assert tags["layout.world_size"] == "1" and tags["team"] == "pretraining"
    assert tags["mlflow.source.git.commit"] == p["code.git_commit"]
    assert tags["cascade.group"] == "sweep-a"  # runs of one sweep, grouped
    assert _steps(client, run.info.run_id, "loss") == [5, 10, 15, 20]  # one step axis
    assert _steps(client, run.info.run_id, "valid/nelbo") == [0, 10, 20]
    for key in ("nelbo", "ppl_bound", "masked_acc", "lr", "grad_norm", "tokens_per_s",
                "step_time", "memory_gb", "summary/tokens_per_s"):
        assert key in run.data.metrics, key
    local = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    sent = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sent == {r["step"]: r["loss"] for r in local if r["split"] == "train"}
    files = _artifacts(client, run.info.run_id)
    assert {"config.yaml", "checkpoints/manifest.json", "plots/loss.png",
            "plots/ppl_bound.png", "samples/step_0000020.txt"} <= set(files)
    manifest = json.load(open(client.download_artifacts(run.info.run_id,
                                                        "checkpoints/manifest.json",
                                                        str(tmp_path))))
    assert [c["step"] for c in manifest] == [10, 20]
    assert manifest[-1]["layout"]["world_size"] == 1
    assert open(client.download_artifacts(run.info.run_id, "plots/loss.png",
                                          str(tmp_path)), "rb").read(4) == b"\x89PNG"
    # `cascade runs`: the same run, its final metrics, as a table and as JSON
    table = helpers.cascade("runs", "readback", "--tracking-uri", server.uri)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["run", "status", "step"] and row.split()[:3] == \
        ["base", "FINISHED", "20"]
    listed = json.loads(helpers.cascade("runs", "readback", "--tracking-uri", server.uri,
                                "--group", "sweep-a", "--json").stdout)
    assert listed["run_id"] == run.info.run_id and listed["step"] == 20
    assert listed["valid/nelbo"] == pytest.approx(run.data.metrics["valid/nelbo"])


def test_server_killed_mid_run_loses_nothing(tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start()
    run_dir = tmp_path / "run"
    # the server dies after 20 logged steps and comes back 30 steps later; a run that ends
    # meanwhile waits for it (tracking.flush_timeout) before finishing
    proc = cascade("train", "configs/base.yaml", "model.num_layers=2",
                   "model.hidden_size=64", "data.seq_len=64", "train.micro_batch_size=4",
                   "train.global_batch_size=4", "train.steps=200", "train.log_interval=1",
                   "train.eval_interval=0", "checkpoint.interval=1000", "optimizer.warmup_steps=2",
                   f"run_dir={run_dir}", f"tracking.uri={server.uri}",
                   "tracking.flush_timeout=120", background=True)
    try:
        metrics = run_dir / "metrics.jsonl"

        def logged():
            return sum(1 for _ in open(metrics)) if metrics.exists() else 0

        deadline = time.time() + 300
        while logged() < 20 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        start = logged()
        server.stop()  # dies mid-run (a step takes ~15 ms: the run must be long enough that
        # it is still training after the kill and 30 more steps on a slow machine)
        while logged() < start + 30 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the server died"
        server.start()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, err
    assert err.count("does not answer") == 1 and "answers again" in err
    client = MlflowClient(server.backend)  # the server's own store, read directly
    run_id = _run_id(run_dir)
    assert client.get_run(run_id).info.status == "FINISHED"
    sent = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    local = {r["step"]: r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))}
    assert sent == local and sorted(sent) == list(range(1, 201))
    assert (run_dir / "mlflow_journal.jsonl").stat().st_size == 0  # all sent: cut back


@pytest.mark.parametrize("uri", ["htp://127.0.0.1:5000", "http://", "mlruns",
                                 "http://127.0.0.1:notaport"])
def test_malformed_tracking_uri_fails_before_training(tmp_path, uri):
    proc = helpers.cascade("train", "configs/base.yaml", *TINY, f"run_dir={tmp_path}/run",
                   f"tracking.uri={uri}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "tracking.uri" in proc.stderr and uri in proc.stderr
    assert not (tmp_path / "run").exists()


def test_experiment_refused_by_the_server(server, tmp_path):
    client = MlflowClient(server.uri)
    client.delete_experiment(client.create_experiment("retired"))
    proc = cascade("train", "configs/base.yaml", *TINY, f"run_dir={tmp_path}/run",
                   f"tracking.uri={server.uri}", "tracking.experiment=retired")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("cascade: error:") and "retired" in proc.stderr
    assert "deleted" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unreachable_server_at_start_warns_and_buffers(tmp_path):
    from mlflow_server import free_port

    run_dir = tmp_path / "run"
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"  # credentials in the URI
    proc = cascade("train", "configs/base.yaml", *TINY, f"run_dir={run_dir}",
                   f"tracking.uri={uri}", "tracking.flush_timeout=1")
    assert proc.returncode == 0, proc.stderr
    assert "does not answer" in proc.stderr and "Traceback" not in proc.stderr
    # redacted on the console and in every file of the run (configs, checkpoint, buffers)
    assert "s3cret" not in proc.stderr + proc.stdout and "http://***@127.0.0.1" in proc.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"s3cret" not in path.read_bytes(), path
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    unsent = [json.loads(line) for line in open(run_dir / "mlflow_journal.jsonl")]
    assert [m[3] for m in unsent if m[0] == "loss"] == [5, 10, 15, 20]
    # a resume names what changed since the checkpoint, and the redacted URI is not a change
    resumed = cascade("train", "configs/base.yaml", *TINY, f"run_dir={run_dir}", "train.steps=21",
                      f"tracking.uri={uri}", "tracking.flush_timeout=1")
    assert resumed.returncode == 0, resumed.stderr
    said = resumed.stdout + resumed.stderr
    assert "train.steps" in said and "tracking.uri" not in said and "s3cret" not in said


def _session(sid: int) -> list:
    """The live processes of session `sid` (a run started in a session of its own)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(name))
    return out


def test_kill_9_three_times_loses_no_metric_and_sends_none_twice(tmp_path):
    """kill -9 of the trainer alone at random steps, three times (the third inside a checkpoint
    save), then a normal finish, on the default sqlite store: MLflow holds every step of
    metrics.jsonl once, with its values (the steps re-run after each resume are not sent again),
    the artifacts spooled before a kill arrive, and a kill leaves no process of the run behind
    within 5 s."""
    import random
    import signal
    import subprocess
    import sys

    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "cascade_mega", "train", "configs/base.yaml", *TINY,
            "train.steps=40", "train.log_interval=1", "checkpoint.interval=4",
            f"run_dir={run_dir}"]
    metrics, ckpts = run_dir / "metrics.jsonl", run_dir / "checkpoints"

    def last_step():
        steps = [json.loads(line)["step"] for line in open(metrics) if line.endswith("\n")] \
            if metrics.exists() else []
        return max(steps, default=-1)

    reached = 0
    for kill in range(3):
        with open(tmp_path / f"log{kill}", "w") as log:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log,
                                    start_new_session=True)
        target = rng.randint(reached + 3, reached + 8)
        in_save = kill == 2
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            opened = (run_dir / "mlflow_run_id").exists()  # so the kill leaves a run to resume
            if opened and last_step() >= target and (not in_save or any(
                    n.endswith(".partial") for n in (os.listdir(ckpts) if ckpts.exists()
                                                     else []))):
                break
            time.sleep(0.001 if in_save and last_step() >= target else 0.05)
        assert proc.poll() is None, (seed, open(tmp_path / f"log{kill}").read()[-3000:])
        os.kill(proc.pid, signal.SIGKILL)  # the trainer alone, not its session
        if in_save:
            assert any(n.endswith(".partial") for n in os.listdir(ckpts)), seed
        proc.wait()
        deadline = time.time() + 5
        while _session(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _session(proc.pid), f"processes {_session(proc.pid)} outlived the trainer"
        reached = last_step()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    run_id = _run_id(run_dir)
    local = [json.loads(line) for line in open(metrics)]
    for split, prefix in (("train", ""), ("valid", "valid/")):
        records = [r for r in local if r["split"] == split]
        for key in ("loss", "nelbo") if split == "train" else ("nelbo", "ppl_bound"):
            history = client.get_metric_history(run_id, prefix + key)
            assert sorted(m.step for m in history) == [r["step"] for r in records], (seed, key)
            if key != "step_time":
                assert {m.step: m.value for m in history} == \
                    {r["step"]: r[key] for r in records}, (seed, key)
    assert [r["step"] for r in local if r["split"] == "train"] == list(range(1, 41))
    assert (run_dir / "mlflow_journal.jsonl").stat().st_size == 0
    assert not os.listdir(run_dir / "mlflow_pending")
    # every start that reached the store counts (one killed before its tracker opened the run
    # does not), the first created it: 0 to 3 restarts, and one MLflow run
    assert int(client.get_run(run_id).data.tags["cascade.restarts"]) <= 3, seed
    # a kill before the first checkpoint made the restart a new attempt (`train/attempts.py`):
    # one MLflow run per attempt that reached the store, none left RUNNING
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    archived = [p for p in (run_dir / "attempts").glob("*/mlflow_run_id")] \
        if (run_dir / "attempts").exists() else []
    assert len(runs) == 1 + len(archived), seed
    assert all(r.info.status != "RUNNING" for r in runs), seed
    assert {"config.yaml", "checkpoints/manifest.json"} <= set(_artifacts(client, run_id))


@pytest.mark.parametrize("death", ["before_state", "before_cut"])
def test_journal_killed_inside_an_ack_sends_no_step_twice(tmp_path, monkeypatch, death):
    """The random kills above rarely land inside an acknowledgement: this one dies there on purpose
    (before the state file is replaced, or between that and cutting the journal back). The next
    start resends only records identical to the ones sent (the store ignores those), and the steps
    a resume runs again, with new timestamps, are not journaled again."""
    import random

    from cascade_mega.tracking import journal as journal_mod

    class Death(Exception):
        pass

    rng = random.Random()
    sent = [("loss", rng.random(), 1000 + s, s) for s in range(1, 8)]
    journal = journal_mod.Journal(str(tmp_path), max_pending=100)
    journal.open(fresh=True)
    journal.append(sent)
    records, end = journal.next_chunk()
    assert records == sent
    if death == "before_state":
        monkeypatch.setattr(journal_mod.os, "replace", lambda *a: (_ for _ in ()).throw(Death()))
    else:
        real = journal.writer

        class Dying:
            def __getattr__(self, name):
                if name == "truncate":
                    raise Death()
                return getattr(real, name)
        journal.writer = Dying()
    with pytest.raises(Death):
        journal.ack(records, end)
    monkeypatch.undo()
    real_writer = journal.writer if death == "before_state" else real
    real_writer.close()  # the process is gone

    again = journal_mod.Journal(str(tmp_path), max_pending=100)
    again.open(fresh=False)
    resent, _ = again.next_chunk()
    assert set(resent) <= set(sent)
    again.append([("loss", rng.random(), 2000 + s, s) for s in range(5, 8)])  # the re-run steps
    again.append([("loss", 0.5, 3000, 8)])
    assert [r for r in again.next_chunk()[0] if r not in sent] == [("loss", 0.5, 3000, 8)]
    again.close()


def test_a_start_from_step_0_is_a_new_attempt_with_a_history_of_its_own(tmp_path):
    """A bf16 run killed (kill -9) before its first checkpoint, then the same run directory
    restarted in fp32: the first attempt's outputs move to attempts/1 and its MLflow run is
    marked KILLED, pointing at the new one; the new MLflow run holds exactly metrics.jsonl's
    values and the fp32 config. Then `train.resume=none` over the finished run, and its `latest`
    deleted: the fallback resumes the new attempt's checkpoint, never an archived one."""
    import signal

    run_dir = tmp_path / "run"
    args = ["train", "configs/base.yaml", *TINY, "train.steps=6", "train.log_interval=1",
            "train.eval_interval=0", "checkpoint.interval=100", f"run_dir={run_dir}"]
    proc = cascade(*args, "train.precision=bf16", "train.steps=10000", background=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (
                (run_dir / "mlflow_run_id").exists() and len(helpers.records(run_dir)) >= 2):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    first_id = _run_id(run_dir)
    done = helpers.cascade(*args, "train.precision=fp32")
    assert done.returncode == 0, done.stderr
    assert "earlier attempt's checkpoints, metrics and MLflow run are kept in" in done.stdout
    assert (run_dir / "attempts" / "1" / "mlflow_run_id").read_text().strip() == first_id
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    run_id = _run_id(run_dir)
    run, first = client.get_run(run_id), client.get_run(first_id)
    assert run_id != first_id and run.data.params["train.precision"] == "fp32"
    assert run.data.tags["cascade.previous_attempt"] == first_id
    assert first.info.status == "KILLED" and first.data.tags["cascade.next_attempt"] == run_id
    local = [r for r in helpers.records(run_dir) if r["split"] == "train"]
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["loss"]) for r in local]
    assert [r["step"] for r in local] == list(range(1, 7))

    # resume=none over it (a checkpoint at 3), then that checkpoint's pointer lost
    again = helpers.cascade(*args, "train.resume=none", "train.steps=3")
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(run_dir / "attempts")) == ["1", "2"]
    (run_dir / "checkpoints" / "latest").unlink()
    last = helpers.cascade(*args, "train.steps=4")
    assert last.returncode == 0, last.stderr
    assert "iter_0000003" in last.stdout + last.stderr and "iter_0000006" not in last.stdout
    assert [r["step"] for r in helpers.records(run_dir) if r["split"] == "train"] == [1, 2, 3, 4]
