"""The hooks the trainer calls, in order, on the logging rank only (the last pipeline stage,
first tensor-, context- and data-parallel rank: its metrics are already reduced).

    on_train_start(trainer)                    after set-up and resume (`trainer.start_step`)
    on_eval_end(trainer, step, metrics)        after each evaluation (step 0 too, before training)
    on_step_end(trainer, step, metrics)        after each logged step (`train.log_interval`)
    on_checkpoint_end(trainer, step, path)     after a checkpoint is complete on disk
    on_train_end(trainer)                      always, last; `trainer.outcome` says how it ended:
                                               'finished', 'stopped' (to be resumed) or 'failed'

A callback overrides the hooks it needs; the others do nothing. Callbacks run in list order
(those that hand work to another, e.g. samples and plots to the MLflow tracker, come first).
A hook must not block the step for long: send work elsewhere (the tracker's thread does).
"""

from __future__ import annotations


class Callback:
    def on_train_start(self, trainer) -> None:
        pass

    def on_eval_end(self, trainer, step: int, metrics: dict) -> None:
        pass

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        pass

    def on_checkpoint_end(self, trainer, step: int, path: str) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass
