"""Several gloo processes (torchrun, started by `cascade train --nproc-per-node`) give the
single-process losses and gradient norms."""

import json
import os

import pytest

from helpers import assert_same_records as _assert_same
from helpers import cascade, records as _records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["train", "configs/base.yaml", "model.num_layers=2", "model.hidden_size=64",
        "data.seq_len=64", "diffusion.block_size=8", "train.micro_batch_size=2",
        "train.global_batch_size=4", "optimizer.warmup_steps=2", "train.steps=4",
        "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1",
        "tracking.enabled=false"]


def _run(tmp_path, name, *extra, printed=None):
    """The run's metrics records; `printed` (a list) receives what it printed. A one-process run
    runs in this process (no interpreter start); several ranks under torchrun, from a `cascade`
    process of their own, whose output holds theirs."""
    ranks = "--nproc-per-node" in extra
    proc = cascade(*ARGS, *extra, f"run_dir={tmp_path}/{name}", process=ranks, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"run_dir: {tmp_path}/{name}"
    if printed is not None:
        printed.append(proc.stdout)
    return _records(tmp_path / name)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _line(printed: str, start: str) -> str:
    return next(line for line in printed.splitlines() if line.startswith(start))


def test_data_parallel_matches_single_process(tmp_path):
    single = _run(tmp_path, "single")
    # the distributed optimizer shards Adam state across the two ranks, and checkpoints it; the
    # gradient reduce (in buckets of 20k elements: several per backward) and the parameter
    # all-gather overlap with compute, as on a GPU
    _assert_same(single, _run(tmp_path, "dp2_distopt", "--nproc-per-node", "2",
                              "parallel.distributed_optimizer=true",
                              "parallel.overlap_grad_reduce=true",
                              "parallel.overlap_param_gather=true", "parallel.bucket_size=20000"))
    assert (tmp_path / "dp2_distopt" / "checkpoints" / "latest").exists()
    # the same in bf16, stopped and resumed exactly (the state of every gradient bucket, dense
    # and expert, `checkpoint/distopt_state.py`), and a checkpoint resumed at another
    # data-parallel size: tests/test_moe.py (EP = 2 with the distributed optimizer)


@pytest.mark.parametrize("nproc,overrides,needle", [
    (2, ["parallel.pipeline=4"], "parallel.pipeline"),  # layers: 2 do not split into 4 stages
    (3, ["parallel.tensor=2"], "world size 3"),  # layout does not divide the world size
    (3, ["parallel.tensor=3"], "model.num_attention_heads"),  # 4 heads on 3 ranks
    (2, ["parallel.context=2", "data.seq_len=72"], "data.seq_len"),  # 4 chunks of whole blocks
    (2, ["parallel.context=2", "data.seq_len=66", "diffusion.block_size=66"],
     "multiple of 2 x context = 4"),  # B = L: 4 chunks of a 66-row view
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "diffusion.objective=ar",
         "data.seq_len=63"], "parallel.sequence_parallel"),  # 63 rows on 2 ranks
    # experts: 6 on 4 ranks; top 7 of 6; EP 2 in a world of 3; EP without experts
    (4, ["model.moe.num_experts=6", "parallel.expert=4"], "'model.moe.num_experts' = 6"),
    (2, ["model.moe.num_experts=6", "model.moe.top_k=7"], "'model.moe.top_k' = 7 exceeds"),
    (3, ["model.moe.num_experts=6", "parallel.expert=2"], "does not tile the world"),
    (2, ["parallel.expert=2"], "need 'model.moe.num_experts'"),
])
def test_impossible_layout_fails_before_any_process_starts(tmp_path, capsys, monkeypatch, nproc,
                                                           overrides, needle):
    """The command line refuses the layout itself (in this process: no torchrun is started)."""
    from cascade_launchers import torchrun
    from cascade_mega import cli

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torchrun, "launch", lambda *a: pytest.fail("torchrun started"))
    code = cli.main([*ARGS, "--nproc-per-node", str(nproc), *overrides, f"run_dir={tmp_path}/bad"])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("cascade: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert not (tmp_path / "bad").exists()


LAYOUT_ARGS = ["model.num_layers=4", "model.num_query_groups=2", "train.global_batch_size=8",
               "train.steps=3", "train.eval_interval=0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run every layout below is compared with (LAYOUT_ARGS). Pipeline
    parallel's 1F1B schedule runs in TP 2 x PP 2 below, its interleaved one at PP 2 x VPP 2;
    initial weights come from per-layer seeds, so a pipeline stage builds the same weights."""
    return _run(tmp_path_factory.mktemp("reference"), "single", *LAYOUT_ARGS)


def test_tensor_parallel_matches_single_process(tmp_path):
    """TP = 2 with sequence parallelism, on the score-entropy loss, whose sum over the
    vocabulary is reduced across the ranks' slices (the CE at TP: TP 2 x PP 2 below), and a
    time-conditioned model: each rank adds its slice of the rows' noise-level embeddings and
    the embedder's gradients are summed over the ranks (a half gradient changes grad_norm)."""
    extra = ("diffusion.loss=score_entropy", "model.time_conditioning=true")
    _assert_same(_run(tmp_path, "single", *LAYOUT_ARGS, *extra),
                 _run(tmp_path, "tp2", "--nproc-per-node", "2", *LAYOUT_ARGS, *extra,
                      "parallel.tensor=2", "parallel.sequence_parallel=true"))


def test_interleaved_pipeline_matches_single_process(tmp_path, single):
    records = _run(tmp_path, "vpp", "--nproc-per-node", "2", *LAYOUT_ARGS,
                   "parallel.pipeline=2", "parallel.virtual_pipeline=2")
    _assert_same(single, records)
    assert (tmp_path / "vpp" / "checkpoints" / "latest").read_text().strip() == "iter_0000003"


def test_context_parallel_matches_single_process(tmp_path, single):
    """CP = 2: each rank holds two zigzag chunks of [x_t ; x_0] and gathers the clean stream's
    K/V: with shifted prediction, two complementary views (targets whose predicting row sits on
    the other rank) and packed documents, time-conditioned (each row's noise level goes with
    it). Full diffusion (B = L) gathers every view: two complementary views, and one view on
    the score-entropy loss, with packed documents and time conditioning. (The AR objective takes the same path with one
    stream and B = 1: its attention at CP, tests/test_kernels.py's causal case.)"""
    full = ["diffusion.block_size=64", "data.document_mask=true", "model.time_conditioning=true",
            "train.eval_interval=3", "model.num_layers=2"]  # validation bounds at steps 0, 3
    for name, extra in (("views", ["diffusion.shifted_prediction=true", "diffusion.views=2",
                                   "diffusion.complementary=true", "data.document_mask=true",
                                   "model.time_conditioning=true"]),
                        # full diffusion (B = L): every view's K/V gathered
                        ("full_views", full + ["diffusion.shifted_prediction=true",
                                               "diffusion.views=2", "diffusion.complementary=true"]),
                        ("full_scores", full + ["diffusion.loss=score_entropy"])):
        reference = _run(tmp_path, f"{name}_single", *LAYOUT_ARGS, *extra)
        _assert_same(reference, _run(tmp_path, f"{name}_cp2", "--nproc-per-node", "2",
                                     *LAYOUT_ARGS, *extra, "parallel.context=2"),
                     keys=("loss", "grad_norm", "nelbo_common", "nelbo_ce"))


def test_tp2_pp2_matches_and_its_checkpoint_resumes_on_one_process(
        tmp_path, single):
    """Four ranks (TP=2 x PP=2, sequence parallel) match the single process and stop at step 2;
    one process resumes from their checkpoint (model and optimizer state resharded): every step,
    loss and gradient norm, equals the uninterrupted run. (The converted models' logits at other
    layouts: test_convert.py.)"""
    printed = []
    first = _run(tmp_path, "tp2pp2", "--nproc-per-node", "4", *LAYOUT_ARGS, "parallel.tensor=2",
                 "parallel.pipeline=2", "parallel.sequence_parallel=true",
                 "train.exit_interval=2", printed=printed)
    assert [r["step"] for r in first] == [1, 2]
    _assert_same(single[:2], first)
    assert (tmp_path / "tp2pp2" / "checkpoints" / "latest").read_text().strip() == \
        "iter_0000002"
    resumed = _run(tmp_path, "tp2pp2", *LAYOUT_ARGS, printed=printed)  # TP = PP = 1, resume=auto
    _assert_same(single, resumed)
    # the start line counts the whole model over the four shards: what one process holds
    counts = [_line(out, "model ").split(" | ")[0] for out in printed]
    assert counts[0] == counts[1] and " parameters (" in counts[0]
    assert "layout TP 2 x PP 2 x CP 1 x DP 1" in _line(printed[0], "model ")


@pytest.mark.parametrize("layout", [
    ["--nproc-per-node", "4", "parallel.tensor=2", "parallel.pipeline=2",
     "parallel.sequence_parallel=true"],
    ["--nproc-per-node", "2", "parallel.context=2", "diffusion.shifted_prediction=true",
     "diffusion.views=2", "diffusion.complementary=true", "data.document_mask=true",
     "model.time_conditioning=true"]], ids=["tp2_pp2_sp", "cp2"])
def test_bf16_layouts_resume_exactly(tmp_path, layout):
    """bf16 at TP 2 x PP 2 with sequence parallel, and at CP 2 (views, documents, time
    conditioning): a second run directory resumed from the first run's step-2 checkpoint
    (`train.resume=PATH`) gives its steps 3 and 4 exactly. (Each layout against one process: the
    fp32 tests above, to 1e-5; every objective in bf16: tests/test_precision.py.)"""
    args = [*LAYOUT_ARGS, *layout, "train.steps=4", "checkpoint.interval=2",
            "train.precision=bf16"]
    straight = _run(tmp_path, "straight", *args)
    resumed = _run(tmp_path, "resumed", *args,
                   f"train.resume={tmp_path}/straight/checkpoints/iter_0000002")
    steps = [(r["step"], r["loss"], r["grad_norm"]) for r in resumed]
    assert [s for s, _, _ in steps] == [3, 4]
    assert steps == [(r["step"], r["loss"], r["grad_norm"]) for r in straight if r["step"] > 2]


def test_profile_memory_and_a_heartbeat_that_names_a_stopped_rank(tmp_path):
    """Two ranks: `train.profile` writes one Chrome trace per rank holding the profiled steps and
    names the top kernels; every rank's peak memory is reported once; rank 1 stopped with SIGSTOP
    is named by the heartbeat (through `cascade jobs`), while rank 0, blocked in a collective
    waiting for it, is alive; a second trainer on the live run's directory is refused, naming
    rank 0. Then kill -9 of the launcher alone: no rank outlives it by 5 s, and the next trainer
    takes over the lock it left."""
    import signal
    import time

    from cascade_mega.runtime import heartbeat

    run_dir = tmp_path / "beat"
    proc = cascade(*ARGS, "--nproc-per-node", "2", "train.steps=10000", "train.eval_interval=0",
                   "checkpoint.interval=10000", "train.profile=[1,3]", "train.heartbeat_s=0.2",
                   f"run_dir={run_dir}", background=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (
                len(beats := heartbeat.read(run_dir)) == 2 and
                min(b["step"] or 0 for b in beats) >= 4):
            time.sleep(0.2)
        assert len(beats) == 2, "the ranks never beat"
        stopped = next(b for b in beats if b["rank"] == 1)
        os.kill(stopped["pid"], signal.SIGSTOP)
        try:
            time.sleep(2.0)  # ten of its intervals
            report = cascade("jobs", str(run_dir), "--json")
            assert report.returncode == 0, report.stderr
            stalled = json.loads(report.stdout)["stalled"]
            assert len(stalled) == 2 and stalled[0].startswith(
                f"rank 1 ({stopped['host']}, pid {stopped['pid']}) stopped: no heartbeat for ")
            assert stalled[1].startswith("the other 1 ranks are alive at step ")
        finally:
            os.kill(stopped["pid"], signal.SIGCONT)
        # a second trainer on the live run's directory stops with one message naming rank 0,
        # before it writes anything there
        holder = next(b for b in beats if b["rank"] == 0)
        recorded = (run_dir / "config.yaml").read_text()
        second = cascade(*ARGS, f"run_dir={run_dir}")
        assert second.returncode == 2 and second.stderr.count("error:") == 1, second.stderr
        assert f"is in use by the trainer on {holder['host']} (PID {holder['pid']}" in \
            second.stderr
        assert (run_dir / "config.yaml").read_text() == recorded
    finally:  # the run ends here: kill -9 of `cascade train` alone; torchrun and the ranks (each
        # in a session of its own; they start no helper process) die with it within 5 s
        ranks = [b["pid"] for b in heartbeat.read(run_dir)]
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.time() + 5
        while time.time() < deadline and any(map(_alive, ranks)):
            time.sleep(0.1)
        left = [pid for pid in ranks if _alive(pid)]
        for pid in left:  # what the test started, by PID
            os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun, if it outlived the launcher too
        except ProcessLookupError:
            pass
        out, _ = proc.communicate(timeout=60)
    assert len(ranks) == 2 and not left, f"ranks {left} outlived the killed launcher"
    for rank in (0, 1):
        trace = json.load(open(run_dir / "profile" / f"rank{rank}.pt.trace.json"))
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert {"ProfilerStep#0", "ProfilerStep#1"} <= names and "aten::mm" in names
    assert _line(out, "profile of steps 2-3: ").count("%") == 5
    memory = _line(out, "peak resident memory after step 3: max ")
    assert memory.endswith(f"over 2 ranks; per rank in {run_dir}/memory.json")
    assert len(json.load(open(run_dir / "memory.json"))["peak_gb"]) == 2
    # its lock is left behind by the kill -9; its holder is gone, so the next trainer takes it
    again = cascade(*ARGS, f"run_dir={run_dir}")
    assert again.returncode == 0 and "taking over the lock of" in again.stderr, again.stderr
    assert not (run_dir / "LOCK").exists()


SIGNAL_ARGS = ["train", "configs/base.yaml", "model.num_layers=1", "model.hidden_size=64",
               "data.seq_len=32", "diffusion.block_size=8", "train.micro_batch_size=2",
               "train.global_batch_size=4", "train.steps=1000", "optimizer.warmup_steps=0",
               "optimizer.decay_style=constant", "train.log_interval=1", "train.eval_interval=0",
               "checkpoint.interval=1000", "tracking.enabled=false"]


def test_a_signal_to_the_launcher_alone_checkpoints_every_rank_and_resumes_exactly(tmp_path):
    """`cascade train --nproc-per-node 2`, signalled at the launcher alone (not torchrun, not
    the ranks) with TERM, then USR1 (the launcher as PID 1 of its own PID namespace, as in a
    container), then INT: each time every rank checkpoints the step in flight, `exit.json` says
    'stopped' with the signal, no LOCK or `.partial` is left, and nothing prints a traceback; the
    three attempts together give the uninterrupted run's steps. A rank that does not stop within
    `train.stop_grace_s` is killed with the rest: `exit.json` says 'killed', and nothing stale is
    left. (A constant learning rate: the reference may end at any step.)"""
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT, records

    from cascade_mega.runtime import heartbeat

    run = tmp_path / "run"

    def start(*extra, pid1=False):
        cmd = [sys.executable, "-m", "cascade_mega", *SIGNAL_ARGS, "--nproc-per-node", "2",
               f"run_dir={run}", *extra]
        if pid1:
            cmd = ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def launcher(proc, pid1):
        if not pid1:
            return proc.pid
        for _ in range(100):  # unshare's child: the launcher, PID 1 inside
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                      text=True).stdout.split()
            if children:
                return int(children[0])
            time.sleep(0.1)
        raise AssertionError("unshare started no launcher")

    def step_after(steps_before):
        deadline = time.time() + 240
        while time.time() < deadline:
            done = [r["step"] for r in records(run) if r["split"] == "train"]
            if done and done[-1] > steps_before:
                return
            time.sleep(0.1)
        raise AssertionError("the run made no step")

    stops = []
    for sig, pid1 in ((signal.SIGTERM, False), (signal.SIGUSR1, True), (signal.SIGINT, False)):
        proc = start(pid1=pid1)
        step_after(stops[-1] if stops else 0)
        os.kill(launcher(proc, pid1), sig)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "Traceback" not in out + err, err
        exit_record = json.loads((run / "exit.json").read_text())
        assert (exit_record["outcome"], exit_record["signal"]) == ("stopped", sig.name)
        stops.append(exit_record["step"])
        assert out.splitlines()[-1] == f"stopped after step {stops[-1]} on {sig.name}: " \
            "checkpoint written, resume continues from it"
        assert f"cascade: {sig.name}: the 2 ranks checkpoint the step in flight and stop " \
            "(waiting up to 600 s" in err
        assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{stops[-1]:07d}"
        assert not (run / "LOCK").exists() and \
            not list((run / "checkpoints").glob("*.partial"))
    assert stops == sorted(stops) and len(set(stops)) == 3
    last = stops[-1]
    resumed = [r for r in records(run) if r["split"] == "train"]
    _assert_same(_run(tmp_path, "single", *SIGNAL_ARGS[2:], f"train.steps={last}"), resumed)

    # a rank that cannot stop (SIGSTOP): killed with the rest after the grace time
    proc = start("train.stop_grace_s=2", "train.heartbeat_s=0.2")
    step_after(last)
    frozen = next(b["pid"] for b in heartbeat.read(run) if b["rank"] == 1)
    os.kill(frozen, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 137 and "were killed" in err, err
    assert json.loads((run / "exit.json").read_text())["outcome"] == "killed"
    assert not (run / "LOCK").exists() and not list((run / "checkpoints").glob("*.partial"))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{last:07d}"
