"""The hooks the trainer calls, in order, and on which ranks (OLMo-core's callback model).

Everything `Trainer.fit` does besides stepping, evaluating and deciding to stop is a callback:
the trainer's own components (`builtin()` in `__init__.py`: the exit record, heartbeats, the
schedule search, the step profiler, the memory report, checkpoints; always installed, first) and
those a caller passes to `Trainer` (the console line, metrics.jsonl, MLflow, ...), in that order.

Ranks. A callback runs on the logging rank only (the last pipeline stage, first tensor-,
context- and data-parallel rank: its metrics are already reduced), unless it sets
`every_rank = True`: then every rank calls its hooks at the same points, so a hook may run a
collective (the memory report's all_gather, a checkpoint save, the schedule search's forwards).
Which rank writes a shared file is the callback's own choice (rank 0 for exit.json).

    on_resume(trainer)                    end of set-up, once the checkpoint a run resumes from
                                          is loaded (or none was): `trainer.start_step`; state a
                                          callback keeps in the run directory is read back here
    on_train_start(trainer)               `fit` begins: before the step-0 evaluation and step 1
    pre_step(trainer, step) -> dict|None  before each training step (`step`: steps done). What
                                          it returns joins that step's metrics and has the step
                                          logged; whether a step is logged must agree on every
                                          rank (logging reads metrics reduced across ranks), so
                                          only `every_rank` callbacks return metrics, alike
    post_step(trainer, step, metrics)     after every step (`step` now counts it), logged or not:
                                          `metrics` holds at least lr, grad_norm, step_time,
                                          tokens_per_s and memory_gb
    on_step_end(trainer, step, metrics)   after each logged step (`train.log_interval`), once
                                          the step's update is known to be finite
    on_eval_end(trainer, step, metrics)   after each evaluation (step 0 too, before training)
    on_step_boundary(trainer, step)       last in each step, once the ranks agreed whether to
                                          leave: `trainer.leaving` (a stop signal, named by
                                          `trainer.stop_signal`, or `train.exit_interval`); the
                                          point where state is saved
    on_checkpoint_end(trainer, step, path) after a checkpoint is complete on disk (the
                                          checkpointer emits it, `trainer.emit`)
    close(trainer)                        always, when `fit` ends (finished, stopped or raised),
                                          in reverse list order: a callback releases what it
                                          holds (a thread, a profiler window) and records the
                                          outcome, which is final (the first installed, the exit
                                          record, closes last)
    on_train_end(trainer)                 always, last, in list order; `trainer.outcome` says how
                                          it ended: 'finished', 'stopped' (to be resumed) or
                                          'failed'

Every `close` and `on_train_end` runs even when one before it raised (the first error is raised
after them all), and the trainer then restores the signal handlers and releases the run lock.
A callback overrides the hooks it needs; the others do nothing (plain objects with some of these
methods work too). Callbacks run in list order (those that hand work to another, e.g. samples
and plots to the MLflow tracker, come first). A hook must not block the step for long: send work
elsewhere (the tracker's thread does).
"""

from __future__ import annotations


class Callback:
    every_rank = False  # True: every rank calls the hooks (which may then run collectives)

    def on_resume(self, trainer) -> None:
        pass

    def on_train_start(self, trainer) -> None:
        pass

    def pre_step(self, trainer, step: int) -> dict | None:
        return None

    def post_step(self, trainer, step: int, metrics: dict) -> None:
        pass

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        pass

    def on_eval_end(self, trainer, step: int, metrics: dict) -> None:
        pass

    def on_step_boundary(self, trainer, step: int) -> None:
        pass

    def on_checkpoint_end(self, trainer, step: int, path: str) -> None:
        pass

    def close(self, trainer) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass
