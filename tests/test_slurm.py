"""`cascade submit` / `cascade jobs` against a real Slurm cluster: slurmctld, two slurmd posing as
two nodes, munge (slurm/devcluster.sh), always torn down, also when a test fails.

Training jobs are CPU runs, one rank per node (data parallel across the two nodes); their losses
must equal a local one-process run of the same config, also when the job is interrupted by the
time-limit warning or preempted, checkpoints, requeues and resumes.
"""

import json
import os
import subprocess
import time

import pytest

import helpers
from helpers import assert_same_records, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["configs/base.yaml", "model.num_layers=2", "model.hidden_size=64",
         "data.seq_len=64", "diffusion.block_size=8", "train.micro_batch_size=2",
         "train.global_batch_size=4", "optimizer.warmup_steps=2", "train.steps=80",
         "train.log_interval=1", "train.eval_interval=40", "train.eval_batches=1",
         "checkpoint.interval=20", "tracking.samples=0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    script = os.path.join(ROOT, "slurm", "devcluster.sh")
    up = subprocess.run([script, "up", "--dir", str(root), "--nodes", "2"], capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, f"the development cluster did not start:\n{up.stderr}"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    try:
        yield root
    finally:
        subprocess.run([script, "down", "--dir", str(root)], timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def cascade(*args, timeout=600, cwd=ROOT):
    """In its own process: Slurm's commands see the environment a user's shell gives them."""
    return helpers.cascade(*args, process=True, timeout=timeout, cwd=cwd)


def submit(*args, cwd=ROOT) -> str:
    proc = cascade("submit", *args, "--cluster", "local", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    return line.split("submitted job ")[1].split()[0]


def in_queue(job_id) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    return bool(out.stdout.strip())


def wait_until(condition, timeout=420, what="the job"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def assert_same_losses(a, b):
    assert_same_records(a, b, ("loss",))


def train_steps(run_dir) -> int:
    return sum(r["split"] == "train" for r in records(run_dir))


def jobs_report(run_dir) -> dict:
    """What `cascade jobs RUN_DIR --json` prints, in-process (cheap enough to poll)."""
    from cascade_mega.slurm import jobs

    return jobs.report(str(run_dir), 5)


def endings(run_dir) -> list:
    return jobs_report(run_dir)["endings"] if (run_dir / "slurm" / "jobs.jsonl").exists() else []


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local") / "run"
    proc = helpers.cascade("train", *TRAIN, f"run_dir={run_dir}")  # in this process
    assert proc.returncode == 0, proc.stderr
    return records(run_dir)


def finished(job_id, run_dir):
    return lambda: not in_queue(job_id) and os.path.exists(
        os.path.join(run_dir, "slurm", "history.jsonl"))


MARKER = 'import sys; print("code marker: {}", file=sys.stderr)\n'


def changed_checkout(path) -> str:
    """A git checkout of the sources whose `cascade_mega/__init__.py` prints a marker, changed
    after its commit (an uncommitted change travels with the job too)."""
    src = helpers.source_checkout(path)
    git = ["git", "-C", src, "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "sources"], check=True)
    with open(os.path.join(src, "cascade_mega", "__init__.py"), "a") as f:
        f.write(MARKER.format("submitted"))
    return src


def test_two_node_job_survives_warning_and_preemption_with_the_local_losses(cluster, local_run,
                                                                           tmp_path):
    """A 2-node job (data parallel across the nodes, fed by the DALI backend), interrupted twice:
    first by the time-limit warning (USR1 to the batch shell, as `--signal=B:USR1@T` sends it),
    then preempted by a job in the higher-priority partition. Each time the ranks checkpoint at
    the same step and the job requeues; the finished run has the per-step losses of an
    uninterrupted local one-process run. It is submitted from a checkout that changes right
    after: the job and both requeued restarts run the code as it was submitted (its marker)."""
    run_dir = tmp_path / "interrupted"
    src = changed_checkout(tmp_path / "src")
    job = submit(*TRAIN, f"run_dir={run_dir}", "data.backend=dali", "--nodes", "2", cwd=src)
    init = os.path.join(src, "cascade_mega", "__init__.py")
    with open(init) as f:
        changed = f.read().replace(MARKER.format("submitted"), MARKER.format("changed"))
    with open(init, "w") as f:
        f.write(changed)
    wait_until(lambda: train_steps(run_dir) >= 3, what="training")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_until(lambda: any(e.startswith("exit 0 signal USR1: requeue: time-limit warning")
                           for e in endings(run_dir)), what="the requeue after the warning")
    first_stop = jobs_report(run_dir)["last_checkpoint_step"]
    wait_until(lambda: max((r["step"] for r in records(run_dir)), default=0) >= first_stop + 2,
               what="the resumed training")  # and far from its end: preempt it mid-run
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-N2", "--exclusive",
                             "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 1"],
                            capture_output=True, text=True, check=True).stdout.strip()
    wait_until(lambda: any(e.startswith("exit 0 signal TERM: requeue: preempted")
                           for e in endings(run_dir)), what="the preemption")
    wait_until(lambda: (endings(run_dir) or [""])[-1] == "exit 0 signal -: done",
               what="the end of the run")
    wait_until(lambda: not in_queue(job) and not in_queue(urgent), what="the jobs' end")
    assert_same_losses(local_run, records(run_dir))
    proc = cascade("jobs", str(run_dir), "--json")  # the command itself, once
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["job_id"] == job and report["last_checkpoint_step"] == 80
    assert report["restarts"] == 2 and len(report["endings"]) == 3
    logs = sorted(os.listdir(run_dir / "slurm" / job))
    assert logs == ["node1.0.out", "node2.1.out"]  # one log per rank, named by its node
    log = (run_dir / "slurm" / job / "node1.0.out").read_text()
    stops = [line.split(" on ")[1].split(":")[0] for line in log.splitlines()
             if line.startswith("stopped after step")]
    assert stops == ["SIGUSR1", "SIGTERM"] and "step     80/80" in log
    code = run_dir / "slurm" / "code"
    # every process of the three starts imported the submitted code, none the changed checkout
    assert "code marker: submitted" in log and "code marker: changed" not in log
    assert log.count(f"+ uncommitted changes from {code}") == 3  # each start names its code
    record = json.loads((code / "code.json").read_text())
    assert record["dirty"] and len(record["commit"]) == 40
    assert "code marker: submitted" in (code / "code.diff").read_text()
    decisions = (run_dir / "slurm" / f"cascade-base-{job}.out").read_text()  # in the batch shell
    assert decisions.count("code marker: submitted") == 3 and "changed" not in decisions
    assert (run_dir / "checkpoints" / "iter_0000080" / "dali" / "rank1.cpt").exists()
    assert (tmp_path / "urgent.out").exists()


def test_sweep_runs_as_a_job_array_grouped_in_mlflow(cluster, tmp_path):
    """`cascade sweep --executor slurm`: two runs (AR, B = 4) as one job array, tracked in the
    sweep's store under its group; a second invocation submits nothing."""
    sweep = tmp_path / "arr.yaml"
    sweep.write_text(f"""name: arr
base: {ROOT}/configs/base.yaml
root: {tmp_path}/arr
head_dim: 32
cluster: local
nodes: 1
array_parallel: 2
overrides: [data.seq_len=64, train.micro_batch_size=2, train.global_batch_size=2,
            train.eval_interval=1000, train.eval_batches=1, tracking.samples=0]
grids:
  - size: [[2, 64]]
    tokens: [384]
    objective: [ar, block_diffusion]
    block_size: [4]
""")
    proc = cascade("sweep", str(sweep), "--executor", "slurm")
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().splitlines()[-1].split("submitted job ")[1].split(":")[0]
    names = ["ar_n2x64_d384", "bd4_n2x64_d384"]
    for name in names:
        run_dir = tmp_path / "arr" / name
        wait_until(lambda d=run_dir: os.path.exists(d / "slurm" / "history.jsonl"),
                   what=f"array task {name}")
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
        assert json.loads((run_dir / "slurm" / "jobs.jsonl").read_text())["job_id"] == job
    wait_until(lambda: not in_queue(job), what="the array's end")
    again = cascade("sweep", str(sweep), "--executor", "slurm")
    assert "nothing to submit: every run is finished or queued" in again.stdout, again.stdout
    listed = cascade("runs", "--tracking-uri", f"sqlite:///{tmp_path}/arr/mlflow.db", "--group",
                     "arr", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["run"] for r in rows if r["run"] != "arr") == names
    assert all(r["status"] == "FINISHED" and r["valid/nelbo"] > 0 for r in rows
               if r["run"] != "arr")


def test_chain_runs_in_order(cluster, tmp_path):
    from cascade_mega.data.shakespeare import documents

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(list(documents())[1][:20000])  # a play, one document per line
    prefix = tmp_path / "data" / "plays"
    run_dir = tmp_path / "runs" / "chained"
    chain = tmp_path / "chain.yaml"
    chain.write_text(f"""stages:
  - name: preprocess
    run: preprocess {corpus} --output-prefix {prefix} --train-bpe 400 --lines
  - name: train
    train: configs/base.yaml
    overrides: [data.path={prefix}, run_dir={run_dir}, model.num_layers=2, model.hidden_size=64,
                data.seq_len=64, diffusion.block_size=8, train.steps=2, train.eval_interval=0,
                train.micro_batch_size=2, train.global_batch_size=2, optimizer.warmup_steps=1]
    nodes: 1
  - name: sample
    run: generate --ckpt {run_dir} --prompt "ROMEO" --max-new-tokens 8
""")
    proc = cascade("submit", "--chain", str(chain), "--cluster", "local")
    assert proc.returncode == 0, proc.stderr
    ids = [line.split("submitted job ")[1].split()[0] for line in proc.stdout.splitlines()]
    assert len(ids) == 3
    wait_until(lambda: not any(in_queue(j) for j in ids), what="the chain")
    logs = tmp_path / "slurm-chain"
    times = []
    for name, job in (("preprocess", ids[0]), ("sample", ids[2])):
        text = (logs / f"cascade-{name}-{job}.out").read_text()
        assert "done" in text.splitlines()[-1], text
        times.append(text)
    assert (prefix.parent / "plays.bin").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    train_log = (run_dir / "slurm" / f"cascade-train-{ids[1]}.out").read_text()
    # in order: training started after preprocessing ended, sampling after training
    pre_end = times[0].splitlines()[-1].split("]")[0].strip("[")
    train_start = train_log.splitlines()[0].split("]")[0].strip("[")
    sample_start = times[1].splitlines()[0].split("]")[0].strip("[")
    train_end = train_log.splitlines()[-1].split("]")[0].strip("[")
    assert pre_end <= train_start and train_end <= sample_start
    assert "ROMEO" in times[1]


@pytest.mark.parametrize("args,needle", [
    (["--cluster", "nonesuch"], "unknown cluster profile 'nonesuch'"),
    (["--cluster", "local", "--partition", "gpu"], "partition 'gpu'"),
    (["--cluster", "local", "--gpus-per-node", "4"], "4 GPUs per node"),
    (["--cluster", "local", "--time", "00:01:30"], "time limit 00:01:30"),
    (["--cluster", "local", "--nodes", "3"], "--nodes 3"),
])
def test_bad_submissions_fail_before_anything_is_submitted(cluster, tmp_path, args, needle):
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    proc = helpers.cascade("submit", *TRAIN, f"run_dir={tmp_path}/run", *args)  # in process
    err = proc.stderr
    assert proc.returncode == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


def test_partition_missing_on_the_cluster(cluster, tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("name: site\npartition: gpu\nnodes: 1\ncpus_per_node: 2\n"
                       "device_tflops: 0.05\nassumed_mfu: 1.0\nstartup_s: 30\n")
    proc = helpers.cascade("submit", *TRAIN, f"run_dir={tmp_path}/run", "--cluster", profile)
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "partition 'gpu' does not exist on this cluster (sinfo: debug, urgent)" in err


def test_dry_run_for_sixteen_h100_nodes(tmp_path):
    """The h100 profile's script: pyxis flags, the packaged code first on the path, the requeue
    decision in the batch shell (no second container start inside the warning window)."""
    run = tmp_path / "dry"
    profile = helpers.h100_profile(tmp_path)
    proc = cascade("submit", "configs/base.yaml", "train.global_batch_size=1024",
                   f"run_dir={run}", "--cluster", profile, "--nodes", "16", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ["#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=14", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --open-mode=append", "#SBATCH --exclusive", "#SBATCH --account=my-project",
                 f"#SBATCH --output={run}/slurm/%x-%j.out",
                 f"export CASCADE_CODE={run}/slurm/code  # cascade submit --code package "
                 "(snapshot.py)", f"export PYTHONPATH={run}/slurm/code${{PYTHONPATH:+:$PYTHONPATH}}",
                 "export PYTHONSAFEPATH=1",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "trap 'forward USR1' USR1"]:
        assert line in script.splitlines(), line
    assert 'requeue*) scontrol requeue "$SLURM_JOB_ID" ;;' in script
    step = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"--container-image=/lustre/containers/cascade-mega-0.1.0.sqsh --container-mounts=" \
        f"/lustre:/lustre,/home:/home,{tmp_path}:{tmp_path},{ROOT}:{ROOT} " \
        f"--container-workdir={ROOT}" in step
    decision = next(line for line in script.splitlines() if line.startswith("decision="))
    assert decision.startswith(f"decision=$(cd {run}/slurm/code && python3 -m "
                               "cascade_mega.slurm.requeue") and "srun" not in decision
    assert f"{run}/slurm/$SLURM_JOB_ID/$SLURMD_NODENAME.$SLURM_PROCID.out" in script
    assert not run.exists()  # nothing written, nothing submitted


def test_paths_outside_the_mounts_and_a_short_warning_lead_are_refused(cluster, tmp_path):
    """Before sbatch, one message: a run directory the container cannot see; a warning lead
    shorter than the step in flight plus a checkpoint save."""
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    local = open(os.path.join(ROOT, "configs", "clusters", "local.yaml")).read()
    unmounted = tmp_path / "pyxis.yaml"
    unmounted.write_text(local + f"container_image: /lustre/img.sqsh\n"
                         f"container_mounts: ['/lustre:/lustre', '{ROOT}:{ROOT}']\n")
    slow = tmp_path / "slow.yaml"
    slow.write_text(local + "checkpoint_write_gbps: 0.00001\n")
    for profile, needle in (
            (unmounted, f"the run directory {tmp_path}/run is not inside the container mounts of "
                        f"profile 'local' (/lustre:/lustre, {ROOT}:{ROOT})"),
            (slow, "signal_lead_s 60 s of profile 'local' is shorter than one step")):
        proc = helpers.cascade("submit", *TRAIN, f"run_dir={tmp_path}/run", "--cluster", profile)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


def test_batch_shell_helpers_are_python_3_6_syntax():
    """The requeue decision and the heartbeat report run with the host's python3, outside the
    container: an older cluster's system Python (3.6) must parse them."""
    import ast

    for path in ("cascade_mega/slurm/requeue.py", "cascade_mega/runtime/heartbeat.py"):
        ast.parse(open(os.path.join(ROOT, path)).read(), feature_version=(3, 6))


def test_requeue_decisions(tmp_path):
    """The job script's decision after its training step: requeue on the time-limit warning, on
    preemption and on a first failure; stop on the same failure twice or past the restart cap."""
    from cascade_mega.slurm.requeue import decide

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "latest").write_text("iter_0000040\n")
    d = str(tmp_path)
    assert decide(d, 0, "", 5, 0, []) == "done"
    assert decide(d, 0, "USR1", 5, 1, []).startswith("requeue: time-limit warning")
    assert decide(d, 0, "USR1", 5, 5, []).startswith("stop: 5 restarts")
    assert decide(d, 0, "TERM", 5, 9, [], was_preempted=True).startswith("requeue: preempted")
    assert decide(d, 0, "TERM", 5, 0, []) == "done: SIGTERM (cancelled)"
    assert decide(d, 0, "INT", 5, 0, []) == "done: SIGINT (cancelled)"  # Ctrl-C, scancel -s INT
    first = decide(d, 1, "", 5, 0, [])
    assert first.startswith("requeue: exit 1")
    failed = [{"rc": 1, "signal": None, "last_step": 40, "decision": first}]
    assert decide(d, 1, "", 5, 1, failed).startswith("stop: failed the same way twice")
    assert decide(d, 137, "", 5, 1, failed).startswith("requeue")  # another failure
    (ckpt / "latest").write_text("iter_0000060\n")
    assert decide(d, 1, "", 5, 1, failed).startswith("requeue")  # progress since
