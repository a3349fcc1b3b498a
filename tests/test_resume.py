"""Stop-and-resume reproduces the uninterrupted run's per-step losses exactly; run-dir layout."""

import json
import os

from cascade_mega.config import load_config
from cascade_mega.train.callbacks import MetricsFile
from cascade_mega.train.trainer import Trainer


def _cfg(run_dir, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", "model.num_layers=2", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "data.seq_len=64",
        "diffusion.block_size=8", "train.steps=6", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.log_interval=1", "train.eval_interval=3",
        "train.eval_batches=1", "optimizer.warmup_steps=2", "checkpoint.interval=100",
        "tracking.enabled=false", *extra])


def _run(cfg):
    Trainer(cfg, [MetricsFile(cfg.run_dir)]).setup().fit()
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


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


def test_crash_during_save_keeps_last_checkpoint(megatron, tmp_path):
    from cascade_mega.train import checkpoint

    cfg = _cfg(tmp_path / "run", "checkpoint.interval=3", "train.steps=3")
    trainer = Trainer(cfg).setup().fit()
    root = tmp_path / "run" / "checkpoints"
    (root / "iter_0000006.partial").mkdir()  # what a crash mid-save leaves behind
    assert checkpoint.latest(str(root)).endswith("iter_0000003")
    step, _ = checkpoint.load(checkpoint.latest(str(root)), trainer.chunks, trainer.optimizer,
                              trainer.scheduler)
    assert step == 3


def test_a_scheduler_signal_stops_at_a_step_with_a_checkpoint(megatron, tmp_path):
    """SIGUSR1 (Slurm's time-limit warning) mid-run: checkpoint at the next step boundary, stop;
    the resumed run reproduces the uninterrupted losses."""
    import signal

    class SignalAtStep:
        def on_step_end(self, trainer, step, metrics):
            if step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    straight = _run(_cfg(tmp_path / "straight"))
    cfg = _cfg(tmp_path / "signalled")
    trainer = Trainer(cfg, [MetricsFile(cfg.run_dir), SignalAtStep()]).setup().fit()
    assert (trainer.outcome, trainer.stop_signal, trainer.step) == ("stopped", "SIGUSR1", 2)
    assert (tmp_path / "signalled" / "checkpoints" / "latest").read_text().strip() == \
        "iter_0000002"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    resumed = _run(_cfg(tmp_path / "signalled"))
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in straight]
