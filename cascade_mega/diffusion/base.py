"""The seam between the trainer and a training objective (what OLMo-core calls a TrainModule).

The trainer owns the loop: data -> `objective.batch(...)` -> megatron-core's forward-backward
schedule -> optimizer -> `objective.metrics(...)`. The objective owns everything that differs
from one objective to the next: the block-size schedule, the noise, how a batch of clean tokens
becomes model inputs and loss weights (`prepare`), the forward step (a teacher's forward rides in
it), the loss reduction and what its sums are called.

An objective is built once per run, from the config, the tokenizer and the optional teacher, by
the name in `diffusion.objective` (`register`, `config/objectives.py`; `objectives.build`). It
also answers, from a config alone, the sequence layout it lays out (`layout`: rows per sample,
read-out rows, attention pairs, causal / full / block diffusion), which the config rules,
`cascade plan`, the FLOP count and the decoders ask (`config/objectives.py: layout_of`). A new
objective is one module: a subclass that implements `layout`, `prepare_micro_batch`,
`forward_step`, `loss_sums` and `metrics` (with its own `Sums` dataclass), registered under its
name (`tests/toy_objective.py` is a toy masked LM written that way).

Each micro-batch is made on the host (a pure function of seed, split and step: resumable
without saved RNG state, the same on every device) and crosses once, pinned and non-blocking;
the next one is prepared and queued before the schedule runs the current one.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from cascade_mega.config.objectives import REGISTRY, SequenceLayout, register  # noqa: F401
from cascade_mega.runtime.device import to_device


def noise_generator(seed: int, *key) -> torch.Generator:
    """A generator that is a pure function of (seed, key): resumable without saved RNG state."""
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Shard:
    """Which part of a global batch this rank prepares."""

    dp_rank: int = 0
    dp_size: int = 1
    num_micro: int = 1  # micro-batches per step on this rank (gradient accumulation)
    context: tuple = (0, 1)  # (rank, size) in the context-parallel group


@dataclass
class StepBatch:
    """One step's micro-batches, as megatron-core's schedule takes them."""

    make: Callable[[], Iterator]  # a fresh iterator (one per model chunk under interleaving)
    rows: int  # rows of one sample that travel between pipeline stages
    cfg: object = None  # the config in force for this step (the schedule's, once per step)
    block_size: int | None = None  # the block size in force (reported under a schedule)


class Objective(ABC):
    """Base class. `Sums` is a dataclass of named tensors with `pack()` / `unpack(values)`."""

    Sums = None

    def __init__(self, cfg, tokenizer, shard: Shard, teacher=None):
        self.cfg, self.tokenizer, self.shard, self.teacher = cfg, tokenizer, shard, teacher

    # ------------------------------------------------------------ what subclasses define
    def config_at(self, step: int):
        """The config in force at a training step (a schedule changes it); default: fixed."""
        return self.cfg

    @classmethod
    @abstractmethod
    def layout(cls, cfg) -> SequenceLayout:
        """The sequence layout this objective lays out under `cfg` (from the config alone)."""

    def rows(self, cfg, train: bool) -> int:
        """Rows one sample occupies in the model (what the pipeline sends between stages)."""
        return self.layout(cfg).rows

    @abstractmethod
    def prepare_micro_batch(self, batch, rows: slice, cfg, split: str, step: int, noise):
        """One micro-batch (`batch`: megatron's tokens/labels/loss_mask, rows `rows` of the global
        batch) as a host-side `Prepared`."""

    def validation_passes(self) -> tuple:
        """Splits validated after "valid", each logged as `<metric>_<split>` (default: none)."""
        return ()

    def draw(self, cfg, split: str, step: int):
        """Per-step randomness shared by the micro-batches (e.g. the noise of the global
        batch), or None."""
        return None

    @abstractmethod
    def forward_step(self, data_iterator, model):
        """megatron-core's forward step: (the model's output, the loss function)."""

    @abstractmethod
    def loss_sums(self, prep, output):
        """(loss sum for backward, this micro-batch's `Sums`)."""

    @abstractmethod
    def metrics(self, sums, train: bool) -> dict:
        """Named metrics from a step's summed `Sums` (host floats)."""

    # ------------------------------------------------------------ what the trainer calls
    def batch(self, reader, step: int, split: str, draw=None, cfg=None) -> StepBatch:
        """The micro-batches of one step (train) or one validation batch (`step` = its index);
        `draw` and `cfg` replace the step's own randomness and config (a schedule search's
        noise, at the block size in force in training)."""
        from cascade_mega.data import loader

        if cfg is None:
            cfg = self.config_at(step) if split == "train" else self.cfg
        draw = self.draw(cfg, split, step) if draw is None else draw
        mbs, gbs, s = cfg.train.micro_batch_size, cfg.train.global_batch_size, self.shard

        def prepared(m):
            start = loader.micro_batch_start(step, m, s.dp_rank, cfg, s.dp_size)
            first = start - step * gbs
            host = self.prepare_micro_batch(reader.micro_batch(start, mbs),
                                            slice(first, first + mbs), cfg, split, step, draw)
            return to_device(host)

        def make():
            upcoming = prepared(0)
            for m in range(s.num_micro):
                current = upcoming
                if m + 1 < s.num_micro:
                    upcoming = prepared(m + 1)
                yield current

        scheduled = split == "train" and self.cfg.diffusion.block_size_schedule
        block = cfg.diffusion.block_size if scheduled else None
        return StepBatch(make, self.rows(cfg, split == "train"), cfg, block)

    def loss(self, prep, output):
        """The loss function megatron-core's schedule calls: (loss sum, token count, logged)."""
        loss_sum, sums = self.loss_sums(prep, output)
        return loss_sum, prep.count, {"sums": sums.pack()}

    def zero_sums(self, device) -> torch.Tensor:
        import dataclasses

        return torch.zeros(len(dataclasses.fields(self.Sums)), dtype=torch.float64,
                           device=device)
