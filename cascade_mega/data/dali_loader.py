"""The DALI input pipeline (`data.backend=dali`, extra `[dali]`): the same samples, DALI's transport.

Design choices:
- The samples are megatron-core's GPT dataset samples (document / sample / shuffle indices over the
  memory-mapped `.bin`), exactly those of the default backend: DALI's file readers shard whole
  files, while a pretraining sample is a window cut across documents of one large token file.
  So the pipeline's source is an `external_source` callback that maps DALI's iteration counter to
  the sample index of this data-parallel rank (`loader.micro_batch_start`) and reads that sample.
  It is a pure function of the iteration: DALI's checkpoint (its iteration counter) restores the
  exact next batch, and a run resumed at another data-parallel size starts a fresh pipeline at its
  step instead (the sample map does not depend on the layout).
- One pipeline per rank; CPU with `device_id=None`, on a GPU the batch is copied to the device
  inside the pipeline (`.gpu()`), prefetched ahead of the step.
- Training split only; evaluation reads its few batches through the default reader.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from cascade_mega.data.indexed import DataError
from cascade_mega.data.loader import Batch, micro_batch_start

EXTRA = "data.backend=dali needs NVIDIA DALI: pip install 'cascade_mega[dali]' (nvidia-dali-cuda120)"


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _Samples:
    """DALI source: (tokens, labels, loss_mask) of the sample this rank reads at an iteration."""

    def __init__(self, dataset, cfg, dp_rank: int, dp_size: int, num_micro: int, first_step: int):
        self.dataset, self.cfg = dataset, cfg
        self.dp_rank, self.dp_size, self.num_micro = dp_rank, dp_size, num_micro
        self.first_step = first_step

    def index(self, iteration: int, i: int) -> int:
        step, micro = divmod(iteration, self.num_micro)
        start = micro_batch_start(self.first_step + step, micro, self.dp_rank, self.cfg,
                                  self.dp_size)
        return (start + i) % len(self.dataset)

    def __call__(self, info):
        item = self.dataset[self.index(info.iteration, info.idx_in_batch)]
        return (item["tokens"].numpy().astype(np.int32), item["labels"].numpy().astype(np.int32),
                item["loss_mask"].numpy().astype(np.float32))


class DaliReader:
    """Train micro-batches in the order the trainer consumes them, from a DALI pipeline."""

    name = "train"

    def __init__(self, dataset, cfg, vocab_size: int, dp_rank: int, dp_size: int, num_micro: int,
                 start_step: int, state_dir: str | None = None, rank: int = 0):
        if not available():
            raise DataError(EXTRA)
        self.dataset, self.cfg, self.vocab_size = dataset, cfg, vocab_size
        self.dp_rank, self.dp_size, self.num_micro = dp_rank, dp_size, num_micro
        self.rank = rank
        first_step, checkpoint = start_step, None
        saved = _saved_state(state_dir, rank, dp_size)
        if saved is not None:  # DALI's own checkpoint of this rank, same layout
            first_step, checkpoint = saved
        self.first_step = first_step
        self.samples = _Samples(dataset, cfg, dp_rank, dp_size, num_micro, first_step)
        self.pipe = _pipeline(self.samples, cfg.train.micro_batch_size, checkpoint)
        self.consumed = (start_step - first_step) * num_micro  # iterations already read
        if saved is not None and self.consumed != _iterations(state_dir, rank):
            raise DataError(f"{state_dir}: DALI state does not match the checkpoint's step")

    def micro_batch(self, start: int, size: int) -> Batch:
        expected = micro_batch_start(self.first_step + self.consumed // self.num_micro,
                                     self.consumed % self.num_micro, self.dp_rank, self.cfg,
                                     self.dp_size)
        if start != expected or size != self.cfg.train.micro_batch_size:
            raise DataError(f"the DALI reader delivers samples in training order: asked for "
                            f"{size} from sample {start}, its next batch starts at {expected}")
        tokens, labels, loss_mask = (_to_torch(x) for x in self.pipe.run())
        self.consumed += 1
        top = int(max(tokens.max(), labels.max()))
        if top >= self.vocab_size:
            raise DataError(f"the train blend: token id {top} is beyond the vocabulary "
                            f"({self.vocab_size} entries)")
        return Batch(tokens.long(), labels.long(), loss_mask)

    def save_state(self, directory: str) -> None:
        """DALI's checkpoint of this rank's pipeline, beside the model checkpoint."""
        os.makedirs(directory, exist_ok=True)
        self.pipe.checkpoint(os.path.join(directory, f"rank{self.rank}.cpt"))
        with open(os.path.join(directory, f"rank{self.rank}.json"), "w") as f:
            json.dump({"first_step": self.first_step, "iterations": self.consumed,
                       "dp_size": self.dp_size}, f)


def _saved_state(state_dir, rank, dp_size):
    if not state_dir:
        return None
    meta = os.path.join(state_dir, f"rank{rank}.json")
    if not os.path.isfile(meta):
        return None
    info = json.load(open(meta))
    if info["dp_size"] != dp_size:
        return None  # another layout: a fresh pipeline at the resumed step reads the same samples
    return info["first_step"], open(os.path.join(state_dir, f"rank{rank}.cpt"), "rb").read()


def _iterations(state_dir, rank) -> int:
    return json.load(open(os.path.join(state_dir, f"rank{rank}.json")))["iterations"]


def _pipeline(source, batch_size: int, checkpoint):
    from nvidia.dali import fn, pipeline_def, types

    # a host pipeline on every machine: the noise and layout are made on the host from the batch
    # (`objective.prepare`), and the trainer copies the result to the device once, pinned and
    # non-blocking, as for the default backend
    @pipeline_def(batch_size=batch_size, num_threads=1, prefetch_queue_depth=2, device_id=None,
                  enable_checkpointing=True)
    def samples():
        return tuple(fn.external_source(source=source, batch=False, num_outputs=3,
                                        dtype=[types.INT32, types.INT32, types.FLOAT]))

    pipe = samples(checkpoint=checkpoint)
    pipe.build()
    return pipe


def _to_torch(out) -> torch.Tensor:
    return torch.from_dlpack(out.as_tensor())
