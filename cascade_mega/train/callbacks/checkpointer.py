"""Checkpoints during training: every `checkpoint.interval` steps, at the last step, and when the
run leaves early (a stop signal or `train.exit_interval`: the trainer's `leaving`), at the end of
the step (`on_step_boundary`: after its logging and evaluation).

A save (`cascade_mega/checkpoint/`) is collective: every rank writes its shards, and its reader's
own state (`data/train_reader.py`: the DALI pipeline's) into the folder before it is declared
complete, with the parallel layout and the run's config. The distributed optimizer's parameter
all-gather, overlapped with the next forward, is paused around it (`optim.param_gather_paused`):
the saved weights are the updated ones. `checkpoint.keep_last` never deletes the checkpoint the
run resumed from. Then `on_checkpoint_end` goes to every callback (the tracker uploads the list).
"""

from __future__ import annotations

from cascade_mega import checkpoint
from cascade_mega.config import record_yaml
from cascade_mega.data import train_reader
from cascade_mega.train.callbacks.base import Callback
from cascade_mega.train.optim import param_gather_paused


class Checkpointer(Callback):
    every_rank = True

    def on_step_boundary(self, trainer, step):
        cfg = trainer.cfg
        if step % cfg.checkpoint.interval and step != cfg.train.steps and not trainer.leaving:
            return
        with param_gather_paused(trainer.chunks):
            path = checkpoint.save(
                trainer.ckpt_root, trainer.chunks, trainer.optimizer, trainer.scheduler, step,
                step * cfg.train.global_batch_size, cfg.checkpoint.keep_last,
                lambda folder: train_reader.save_state(trainer.train_data, folder),
                trainer.layout(), record_yaml(cfg), keep=(trainer.resumed_from,),
                # the block size of the last step trained (a block-size schedule's phase)
                block_size=trainer.objective.config_at(max(step - 1, 0)).diffusion.block_size)
        trainer.emit("on_checkpoint_end", step, path)
