"""Stop-and-resume reproduces the uninterrupted run's per-step losses exactly; run-dir layout."""

import json
import os

import pytest

from helpers import TINY_MODEL, train

from cascade_mega.config import load_config
from cascade_mega.train.callbacks import MetricsFile
from cascade_mega.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(run_dir, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", *TINY_MODEL, "model.num_attention_heads=4",
        "model.num_query_groups=2", "train.steps=6", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.log_interval=1", "train.eval_interval=3",
        "train.eval_batches=1", "optimizer.warmup_steps=2", "checkpoint.interval=100",
        "tracking.enabled=false", *extra])


def _run(cfg):
    return train(cfg)[1]


def test_stop_and_resume_is_exact(megatron, tmp_path):
    straight = _run(_cfg(tmp_path / "straight"))
    _run(_cfg(tmp_path / "stopped", "train.exit_interval=3"))  # checkpoints at 3, stops
    ckpts = tmp_path / "stopped" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000003"
    resumed = _run(_cfg(tmp_path / "stopped"))  # resume=auto
    assert len(straight) == len(resumed) == 6 + 3  # six train lines; evals at 0, 3 and 6

    def losses(records, split):
        return [(r["step"], r["loss"]) for r in records if r["split"] == split]

    assert losses(resumed, "train") == losses(straight, "train")
    assert losses(resumed, "valid") == losses(straight, "valid")
    grad = [(r["step"], r["grad_norm"]) for r in straight if r["split"] == "train"]
    assert grad == [(r["step"], r["grad_norm"]) for r in resumed if r["split"] == "train"]


def test_a_resume_continues_on_a_changed_learning_rate_schedule(megatron, tmp_path, capsys):
    """A run resumed with `optimizer.lr` and `optimizer.min_lr` cut (LLaDA's answer to a loss
    spike), through `cascade train`'s callbacks: its first resumed step computes the
    uninterrupted run's loss (weights and Adam state restored), every resumed step logs the new
    schedule's learning rate (that of a run trained at the new settings from the start), the
    resume line names the change, and the MLflow run records it as a tag."""
    from mlflow.tracking import MlflowClient

    from cascade_mega.train.callbacks import standard
    from helpers import records

    straight = _run(_cfg(tmp_path / "straight"))
    _run(_cfg(tmp_path / "run", "train.exit_interval=3"))
    new = ["optimizer.lr=2.5e-4", "optimizer.min_lr=2e-5"]
    cfg = _cfg(tmp_path / "run", *new, "tracking.enabled=true", "tracking.samples=0")
    capsys.readouterr()
    Trainer(cfg, standard(cfg)).setup().fit()
    printed = capsys.readouterr().out
    resumed, reference = records(tmp_path / "run"), _run(_cfg(tmp_path / "reference", *new))

    def lrs(rows):
        return [(r["step"], r["lr"]) for r in rows if r["split"] == "train" and r["step"] > 3]

    assert lrs(resumed) == lrs(reference) and lrs(resumed) != lrs(straight)
    first = [r["loss"] for r in resumed + straight if r["split"] == "train" and r["step"] == 4]
    assert len(first) == 2 and first[0] == first[1]
    assert "changed since that checkpoint: optimizer.lr 0.001 -> 0.00025; optimizer.min_lr " \
        "0.0001 -> 2e-05" in printed, printed
    client = MlflowClient(f"sqlite:///{tmp_path}/run/mlflow.db")
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).data.tags["cascade.changed_at_step.3"].startswith(
        "optimizer.lr 0.001 -> 0.00025")


def test_a_decoder_takes_the_newest_checkpoint_when_its_choice_vanishes(megatron, tmp_path,
                                                                        monkeypatch):
    """`cascade generate` (and eval, convert) reading a run while it trains: the checkpoint it
    chose is removed while it loads (the trainer's `keep_last`), and it loads the newest one
    that verifies instead; a checkpoint folder named explicitly is not replaced."""
    import shutil

    from cascade_mega import checkpoint
    from cascade_mega.inference import load

    _run(_cfg(tmp_path / "run", "checkpoint.interval=3"))
    real, seen = checkpoint.load, []

    def racing(path, *args):
        seen.append(os.path.basename(path))
        if len(seen) == 1:
            shutil.rmtree(path)
        return real(path, *args)

    monkeypatch.setattr(checkpoint, "load", racing)
    load.load_model(str(tmp_path / "run"))
    assert seen == ["iter_0000006", "iter_0000003"]
    seen.clear()
    with pytest.raises(checkpoint.CheckpointError, match="no metadata.json"):
        load.load_model(str(tmp_path / "run" / "checkpoints" / "iter_0000003"))
    assert seen == ["iter_0000003"]


def test_run_directory_layout(megatron, tmp_path):
    records = _run(_cfg(tmp_path / "run", "checkpoint.interval=3"))
    run = tmp_path / "run"
    assert (run / "config.yaml").read_text().startswith("name:")
    assert sorted(os.listdir(run / "checkpoints")) == ["iter_0000003", "iter_0000006", "latest"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    first = records[0]
    assert first["step"] == 0 and first["split"] == "valid" and "ppl_bound" in first
    train = [r for r in records if r["split"] == "train"]
    assert {"loss", "nelbo", "ppl_bound", "masked_acc", "tokens_per_s", "lr", "grad_norm"} \
        <= set(train[0])


# a training job killed (SIGKILL to its whole process group, as a node failure or a cancel does:
# nothing runs after it) inside its step-6 save, either while megatron's writer is writing the
# shards or after they are written, before the commit
KILLED_SAVE = """
import glob, os, signal, sys, threading
from cascade_mega import checkpoint
from cascade_mega.train.callbacks import MetricsFile
from cascade_mega.train.trainer import Trainer
sys.path.insert(0, "tests")
from test_resume import _cfg

mode, run_dir = sys.argv[1:3]
real = checkpoint.dist_checkpointing.save

def save(state, folder):
    if not folder.endswith("iter_0000006.partial"):
        return real(state, folder)
    if mode == "before_commit":
        real(state, folder)
    else:
        writer = threading.Thread(target=real, args=(state, folder), daemon=True)
        writer.start()
        while writer.is_alive() and not glob.glob(os.path.join(folder, "*")):
            pass
    os.killpg(0, signal.SIGKILL)  # this job's own session (the test starts it in one)

checkpoint.dist_checkpointing.save = save
cfg = _cfg(run_dir, "checkpoint.interval=3")
Trainer(cfg, [MetricsFile(cfg.run_dir)]).setup().fit()
"""


@pytest.mark.parametrize("mode", ["mid_write", "before_commit"])
def test_a_process_killed_during_a_save_keeps_the_last_checkpoint(megatron, tmp_path, mode):
    """A real save killed part-way leaves `latest` on the previous checkpoint, which loads; the
    next start resumes from it, clears the leftover and finishes the run."""
    import subprocess
    import sys

    from helpers import ROOT

    from cascade_mega import checkpoint

    run = tmp_path / "run"
    with open(tmp_path / "log", "w+") as log:
        job = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, mode, str(run)], cwd=ROOT,
                               stdout=log, stderr=log, start_new_session=True)
        assert job.wait(timeout=300) == -9, open(tmp_path / "log").read()[-2000:]
    root = run / "checkpoints"
    assert (root / "iter_0000006.partial").is_dir() and not (root / "iter_0000006").exists()
    assert checkpoint.latest(str(root)).endswith("iter_0000003")
    resumed = _run(_cfg(run, "checkpoint.interval=3"))  # resume=auto, from step 3
    assert sorted(os.listdir(root)) == ["iter_0000003", "iter_0000006", "latest"]
    assert [r["step"] for r in resumed if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGINT"])
def test_a_scheduler_signal_stops_at_a_step_with_a_checkpoint(megatron, tmp_path, name):
    """SIGUSR1 (Slurm's time-limit warning) or SIGINT (Ctrl-C) mid-run: checkpoint at the next
    step boundary, stop; the resumed run reproduces the uninterrupted losses."""
    import signal

    sig, before = getattr(signal, name), signal.getsignal(getattr(signal, name))

    class SignalAtStep:
        def on_step_end(self, trainer, step, metrics):
            if step == 2:
                os.kill(os.getpid(), sig)

    straight = _run(_cfg(tmp_path / "straight"))
    cfg = _cfg(tmp_path / "signalled")
    trainer = Trainer(cfg, [MetricsFile(cfg.run_dir), SignalAtStep()]).setup().fit()
    assert (trainer.outcome, trainer.stop_signal, trainer.step) == ("stopped", name, 2)
    assert (tmp_path / "signalled" / "checkpoints" / "latest").read_text().strip() == \
        "iter_0000002"
    assert signal.getsignal(sig) is before  # handlers restored
    resumed = _run(_cfg(tmp_path / "signalled"))
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in straight]


def test_resume_says_where_from_and_names_changed_settings(megatron, tmp_path):
    """The operator's view: a resumed run names its checkpoint and each setting changed since
    (here the step budget and the evaluation interval); step lines carry tokens, ETA and the time."""
    import io
    import re

    from cascade_mega.train.callbacks import ConsoleProgress

    _run(_cfg(tmp_path / "run", "train.exit_interval=3"))
    cfg = _cfg(tmp_path / "run", "train.steps=8", "train.eval_interval=4")
    out = io.StringIO()
    Trainer(cfg, [ConsoleProgress(cfg.train.steps, out)]).setup().fit()
    lines = out.getvalue().splitlines()
    # first the model, the layout, the data (with the epochs the budget implies) and the code
    assert re.fullmatch(r"model [\d,]+ parameters \([\d,]+ without embeddings\) \| layout TP 1 "
                        r"x PP 1 x CP 1 x DP 1", lines[0]), lines[0]
    assert re.fullmatch(r"data builtin:shakespeare: train split 1\.\d+M tokens in \d+ documents "
                        r"\| budget 2\.05k tokens = 0\.00\d+ epochs", lines[1]), lines[1]
    assert lines[2].startswith("code ") and lines[2].endswith(f" from {ROOT}")
    assert lines[3] == f"resumed from {tmp_path}/run/checkpoints/iter_0000003 at step 3"
    assert lines[4] == "changed since that checkpoint: train.steps 6 -> 8; " \
        "train.eval_interval 3 -> 4; train.exit_interval 3 -> None"
    step = [line for line in lines if line.startswith("step ")]
    assert len(step) == 5 and re.search(r"\| tokens 2\.05k \| eta 0:00:0\d \| \d\d:\d\d:\d\d$",
                                        step[-1]), step[-1]


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_loss_stops_the_run_naming_the_step_or_is_skipped(megatron, tmp_path, mode):
    """A NaN in the loss of step 4: its update is never applied. `stop`: one message naming the
    step and the last good checkpoint; `skip`: a warning, the run goes on with finite weights."""
    import torch

    from cascade_mega.train.errors import NonFiniteError

    cfg = _cfg(tmp_path / "run", "checkpoint.interval=2", "train.eval_interval=0",
               f"train.nonfinite={mode}")
    trainer = Trainer(cfg, [MetricsFile(cfg.run_dir)]).setup()
    real, calls = trainer.objective.loss_sums, []

    def poisoned(prep, output):
        loss, sums = real(prep, output)
        calls.append(1)
        if len(calls) == 3 * trainer.num_micro + 1:  # the first micro-batch of step 4
            loss = loss * float("nan")
        return loss, sums

    trainer.objective.loss_sums = poisoned
    if mode == "stop":
        with pytest.raises(NonFiniteError) as err:
            trainer.fit()
        assert str(err.value).startswith("step 4: the loss or the gradients are not finite")
        assert f"last good checkpoint is {tmp_path}/run/checkpoints/iter_0000002" in str(err.value)
        assert trainer.outcome == "failed"
        return
    trainer.fit()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records if r.get("skipped")] == [4]
    assert all(torch.isfinite(p).all() for p in trainer.chunks[0].parameters())
    assert trainer.step == 6 and records[-1]["loss"] == records[-1]["loss"]  # finite again


def _by_step(records, split="train"):
    """step -> loss, the last record of each step (a resumed run re-logs the steps it redoes)."""
    return {r["step"]: r["loss"] for r in records if r["split"] == split}


def test_a_damaged_checkpoint_resumes_from_the_newest_one_that_verifies(megatron, tmp_path,
                                                                         capfd):
    """Checkpoints at steps 2 and 4; the newest damaged four ways (a truncated shard, random
    bytes in a shard, `latest` deleted, metadata deleted): each run resumes from the newest
    checkpoint that verifies, says which one was damaged, and its per-step losses are the
    uninterrupted run's (`keep_last` keeps the one it resumed from); `checkpoint.on_corrupt=stop`
    stops with one message instead."""
    import shutil

    from cascade_mega.checkpoint import CheckpointError

    straight = _by_step(_run(_cfg(tmp_path / "straight")))
    base = tmp_path / "base"
    _run(_cfg(base, "checkpoint.interval=2", "train.exit_interval=4"))
    capfd.readouterr()

    def shard(run):
        return sorted((run / "checkpoints" / "iter_0000004").glob("*.distcp"))[0]

    def truncate(run):
        path = shard(run)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])

    def scribble(run):
        data = bytearray(shard(run).read_bytes())
        data[len(data) // 2:len(data) // 2 + 1024] = os.urandom(1024)
        shard(run).write_bytes(bytes(data))

    cases = {"truncated": (truncate, 2, "__"), "random bytes": (scribble, 2, "checksum"),
             "latest deleted": (lambda r: os.remove(r / "checkpoints" / "latest"), 4, "latest"),
             "metadata deleted": (lambda r: os.remove(r / "checkpoints" / "iter_0000004" /
                                                      "metadata.json"), 2, "metadata.json")}
    for name, (damage, start, needle) in cases.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(base, run)
        damage(run)
        keep = ["checkpoint.keep_last=1"] if name == "truncated" else []
        resumed = _by_step(_run(_cfg(run, "checkpoint.interval=2", *keep)))
        err = capfd.readouterr().err
        assert "warning: " in err and needle in err and \
            f"resuming from {run}/checkpoints/iter_000000{start}" in err, (name, err)
        assert {s: v for s, v in resumed.items() if s > start} == \
            {s: v for s, v in straight.items() if s > start}, name
    # keep_last never deletes the checkpoint a run resumed from
    left = sorted(p.name for p in (tmp_path / "truncated" / "checkpoints").glob("iter_*"))
    assert left == ["iter_0000002", "iter_0000006"]
    run = tmp_path / "stop"
    shutil.copytree(base, run)
    truncate(run)
    with pytest.raises(CheckpointError, match="iter_0000004 is damaged: .* has [0-9]+ bytes"):
        _run(_cfg(run, "checkpoint.on_corrupt=stop"))


def test_a_full_disk_stops_with_one_message_and_the_last_checkpoint_resumes(megatron, tmp_path,
                                                                             monkeypatch):
    """A run on a small tmpfs: the save of step 4 does not fit beside step 2's, which the check
    before the write says in one line (exit 1); with room for it, another writer fills the disk
    during the save: one line again, naming the checkpoint, the path and the free space. Neither
    leaves a `.partial` folder, a LOCK or a temporary tracking store, and the plots spooled for
    the tracking store are written. With the disk grown, the run resumes from step 2 and gives
    the uninterrupted run's steps exactly."""
    import subprocess

    from helpers import cascade, records

    from cascade_mega.checkpoint import space

    args = ["train", "configs/base.yaml", *TINY_MODEL, "train.steps=6", "train.micro_batch_size=2",
            "train.global_batch_size=2", "train.log_interval=1", "train.eval_interval=2",
            "train.eval_batches=1", "optimizer.warmup_steps=1", "checkpoint.interval=2"]
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=22m", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine lets no test mount a tmpfs")
    run = disk / "run"

    def attempt(expected_code):
        out = cascade(*args, f"run_dir={run}")
        assert out.returncode == expected_code, out.stderr
        assert "No space left" not in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert not [n for n in os.listdir(run / "checkpoints") if n.endswith(".partial")]
        assert not (run / "LOCK").exists() and not list(run.glob("mlflow.db.*"))
        return [line for line in out.stderr.splitlines() if "error" in line]

    try:
        errors = attempt(1)  # 14 MB saved at step 2; about 6 MB left for step 4's 14 MB
        assert len(errors) == 1 and errors[0].startswith(
            "cascade: error: not enough space to save checkpoint iter_0000004 in "
            f"{run}/checkpoints (free: ") and "iter_0000002, is intact" in errors[0], errors
        subprocess.run(["mount", "-o", "remount,size=40m", str(disk)], check=True)
        check = space.check

        def check_then_fill(*a, **k):  # the check passes, then another writer leaves 4 MiB
            got = check(*a, **k)
            with open(disk / "other_writer", "wb") as f:
                while space.free_bytes(str(disk)) > 5 << 20:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            return got

        monkeypatch.setattr(space, "check", check_then_fill)
        errors = attempt(1)
        assert len(errors) == 1 and errors[0].startswith(
            "cascade: error: out of space while saving checkpoint iter_0000004 in "
            f"{run}/checkpoints (free: "), errors
        assert json.loads((run / "exit.json").read_text())["outcome"] == "failed"
        stored = {p.name: p.read_bytes() for p in run.glob("mlartifacts/*/artifacts/plots/*")}
        assert stored and stored == {p.name: p.read_bytes() for p in (run / "plots").iterdir()}
        monkeypatch.setattr(space, "check", check)
        os.remove(disk / "other_writer")
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        attempt(0)
        out = cascade(*args, f"run_dir={tmp_path}/straight")
        assert out.returncode == 0, out.stderr
        resumed, straight = ([(r["step"], r["loss"]) for r in records(where)
                              if r["split"] == "train"] for where in (run, tmp_path / "straight"))
        assert resumed == straight and [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_a_schedule_through_full_diffusion_resumes_at_and_after_every_boundary(megatron,
                                                                                tmp_path):
    """{0: 1, 20: 4, 40: L, 60: 4}: AR, block diffusion, full diffusion (no clean stream: the
    auxiliary AR loss takes its own causal stream), block diffusion again, one run. Stopped and
    resumed at each boundary step and one step after it, every step's loss and gradient norm
    equal the uninterrupted run's; each checkpoint records the block size it was trained at,
    and the last one decodes with block size 4."""
    from cascade_mega.inference.load import load_decoder
    from helpers import assert_same_records

    def cfg(run, *extra):
        return load_config(None, [
            f"run_dir={run}", "model.num_layers=1", "model.hidden_size=32",
            "model.num_attention_heads=2", "data.seq_len=16", "diffusion.block_size=4",
            "diffusion.shifted_prediction=true", "diffusion.clean_stream=causal",
            "diffusion.ar_loss_weight=0.5",
            "diffusion.block_size_schedule={0: 1, 20: 4, 40: 16, 60: 4}", "train.steps=64",
            "train.micro_batch_size=2", "train.global_batch_size=2", "train.log_interval=1",
            "train.eval_interval=0", "optimizer.warmup_steps=2", "checkpoint.interval=1000",
            "tracking.enabled=false", *extra])

    straight = _run(cfg(tmp_path / "straight"))
    assert [r["block_size"] for r in straight if r["step"] in (20, 21, 40, 41, 60, 61)] == \
        [1, 4, 4, 16, 16, 4]
    run, done = tmp_path / "stopped", 0
    for stop in (20, 21, 40, 41, 60, 61):
        _run(cfg(run, f"train.exit_interval={stop - done}"))
        info = json.loads((run / "checkpoints" / f"iter_{stop:07d}" / "cascade.json").read_text())
        assert info["step"] == stop and info["block_size"] == {20: 1, 21: 4, 40: 4, 41: 16,
                                                               60: 16, 61: 4}[stop]
        done = stop
    resumed = _run(cfg(run))
    assert_same_records(straight, resumed)
    assert len(straight) == 64
    decoder = load_decoder(str(run))
    assert decoder.B == 4
    assert decoder.generate([[5, 6, 7]], max_new_tokens=8)[0].stopped in ("eod", "length")
