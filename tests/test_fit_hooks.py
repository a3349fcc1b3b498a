"""`Trainer.fit`'s hooks (train/callbacks/base.py) in a real run: the order they run in, the
trainer's own components always on (exit record, heartbeat, schedule search, profiler, memory
report, checkpoints), the schedule search's choice logged with its step, and the end's
guarantees when a callback raises."""

import json
import signal

import pytest

from helpers import records, tiny_cfg

from cascade_mega.train.callbacks import MetricsFile
from cascade_mega.train.trainer import Trainer

HOOKS = ("on_train_start", "pre_step", "post_step", "on_step_end", "on_eval_end",
         "on_step_boundary", "on_checkpoint_end", "close", "on_train_end")


def _cfg(run_dir, *extra):
    return tiny_cfg("data.seq_len=32", "train.steps=4", "train.micro_batch_size=4",
                    "train.global_batch_size=4", "train.resume=none", "train.eval_interval=0",
                    *extra, run_dir=str(run_dir))


class Recorder:
    """Every hook it sees, as (hook, step)."""

    def __init__(self):
        self.seen = []
        for hook in HOOKS:
            setattr(self, hook, self._record(hook))

    def _record(self, hook):
        def record(trainer, *args):
            self.seen.append((hook, args[0] if args else None))
        return record


def test_hooks_in_order_with_the_components_always_on(megatron, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(run, "train.log_interval=100", "checkpoint.interval=2", "train.profile=[1,2]",
               "diffusion.schedule_search.interval=2",
               "diffusion.schedule_search.candidates=[[0.0,1.0],[0.2,0.8]]",
               "diffusion.schedule_search.batches=1", "diffusion.schedule_search.draws=2")
    recorder = Recorder()
    trainer = Trainer(cfg, [MetricsFile(cfg.run_dir), recorder]).setup().fit()
    assert trainer.outcome == "finished"
    step_hooks = []
    for step in range(4):
        logged = [("on_step_end", step + 1)] if step + 1 in (3, 4) else []
        saved = [("on_checkpoint_end", step + 1)] if (step + 1) % 2 == 0 else []
        # the checkpointer, installed before any caller's callback, saves first
        step_hooks += [("pre_step", step), ("post_step", step + 1), *logged, *saved,
                       ("on_step_boundary", step + 1)]
    assert recorder.seen == [("on_train_start", None), *step_hooks, ("close", None),
                             ("on_train_end", None)]
    # the search before step 3 is logged with it, though the log interval is longer
    train = [r for r in records(cfg.run_dir) if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 4]
    assert "schedule_t_min" in train[0] and "schedule_t_min" not in train[1]
    assert json.loads((run / "schedule_search.jsonl").read_text())["step"] == 2
    # the components: exit record, heartbeat, profile trace, memory report, checkpoints
    assert json.loads((run / "exit.json").read_text())["outcome"] == "finished"
    assert json.loads((run / "heartbeat" / "rank0.json").read_text())["closed"]
    assert (run / "profile" / "rank0.pt.trace.json").is_file()
    assert json.loads((run / "memory.json").read_text())["step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["iter_0000002", "iter_0000004", "latest"]
    assert not (run / "LOCK").exists()


class Raises:
    def __init__(self, hook):
        setattr(self, hook, self._raise)

    def _raise(self, trainer, *args):
        raise ValueError("callback failed")


@pytest.mark.parametrize("hook", ["on_train_start", "post_step", "on_train_end"])
def test_a_callback_that_raises_still_ends_the_run_cleanly(megatron, tmp_path, hook):
    """Wherever a callback raises, the run ends as it must: every callback closes and sees the
    end, the exit record says 'failed' (or 'finished': the error came after the outcome), the
    heartbeat is closed, the signal handlers are restored and the run lock released."""
    run = tmp_path / "run"
    cfg = _cfg(run, "train.steps=2", "checkpoint.interval=100")
    before = signal.getsignal(signal.SIGTERM)
    recorder = Recorder()
    trainer = Trainer(cfg, [Raises(hook), recorder]).setup()
    with pytest.raises(ValueError, match="callback failed"):
        trainer.fit()
    assert recorder.seen[-2:] == [("close", None), ("on_train_end", None)]
    outcome = "finished" if hook == "on_train_end" else "failed"
    assert json.loads((run / "exit.json").read_text())["outcome"] == outcome
    assert json.loads((run / "heartbeat" / "rank0.json").read_text())["closed"]
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (run / "LOCK").exists()
