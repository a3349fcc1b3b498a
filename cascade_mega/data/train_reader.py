"""The reader training draws its micro-batches from, chosen by `data.backend`.

Two readers deliver the same samples in the same order (`loader.micro_batch_start`): the train
split itself (megatron-core's GPT dataset, read in the step: `loader.py`), and a DALI pipeline
over that dataset (`data.backend=dali`: `dali_loader.py`). The choice, and where a reader keeps
its state in a checkpoint, belong to the data layer: the trainer asks for a reader and hands it
each checkpoint folder, and never names a backend.

Only DALI's reader has state of its own (its pipeline's iteration counter), kept per rank in
`<checkpoint>/dali/` and read back from the checkpoint a run resumes from; the default reader's
position is a function of the step alone. A module of its own because `dali_loader.py` builds on
`loader.py`: the choice imports both.
"""

from __future__ import annotations

import os
from typing import Optional

STATE = "dali"  # the DALI pipeline's state, a folder inside each checkpoint


def build(cfg, split, dp_rank: int, dp_size: int, num_micro: int, start_step: int, rank: int,
          resumed_from: Optional[str] = None):
    """The train reader for `cfg`: `split` (the train `SplitReader`) itself, or a DALI pipeline
    over its dataset starting at `start_step`, restored from the state in `resumed_from` (the
    checkpoint folder the run resumed from) when it holds one of this layout."""
    if cfg.data.backend != "dali":
        return split
    from cascade_mega.data.dali_loader import DaliReader

    return DaliReader(split.dataset, cfg, split.vocab_size, dp_rank, dp_size, num_micro,
                      start_step, rank=rank,
                      state_dir=os.path.join(resumed_from, STATE) if resumed_from else None)


def save_state(reader, folder: str) -> None:
    """Write `reader`'s own state into the checkpoint `folder` (every rank; nothing for the
    default reader)."""
    if hasattr(reader, "save_state"):
        reader.save_state(os.path.join(folder, STATE))
