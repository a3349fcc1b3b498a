"""Train / validation samples through megatron-core's GPT dataset, indexed deterministically.

Global batch g, micro-batch m, data-parallel rank r read samples
    g * GBS + m * (MBS * DP) + r * MBS + [0, MBS)
so a run resumed at step k reads exactly the samples an uninterrupted run would (no sampler state
to save), and every DP rank reads its own share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from cascade_mega.data import shakespeare
from cascade_mega.data.indexed import DataError, check_dataset, read_meta
from cascade_mega.data.tokenizer import CascadeTokenizer


def resolve_path(path: str) -> str:
    if path == "builtin:shakespeare":
        return shakespeare.ensure_dataset()
    return path


def load_tokenizer(data_cfg, prefix: str) -> CascadeTokenizer:
    meta = read_meta(prefix)
    recorded = os.path.join(os.path.dirname(prefix), meta["tokenizer"])
    path = data_cfg.tokenizer or recorded
    tok = CascadeTokenizer(path)
    if tok.vocab_size != meta["vocab_size"] or (
            data_cfg.tokenizer and open(path).read() != open(recorded).read()):
        raise DataError(f"{prefix}: dataset was tokenised with {recorded}, not with {path}")
    return tok


@dataclass
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor


class SplitReader:
    def __init__(self, dataset: GPTDataset, vocab_size: int, name: str):
        self.dataset, self.vocab_size, self.name = dataset, vocab_size, name

    def micro_batch(self, start: int, size: int) -> Batch:
        n = len(self.dataset)
        items = [self.dataset[(start + i) % n] for i in range(size)]
        tokens = torch.stack([it["tokens"] for it in items])
        labels = torch.stack([it["labels"] for it in items])
        top = int(max(tokens.max(), labels.max()))
        if top >= self.vocab_size:
            raise DataError(f"{self.dataset.dataset_path}: token id {top} is beyond the "
                            f"vocabulary ({self.vocab_size} entries)")
        return Batch(tokens, labels, torch.stack([it["loss_mask"] for it in items]))


def build_splits(cfg, tokenizer: CascadeTokenizer, prefix: str, dp_size: int):
    """(train, valid) SplitReaders sized for the whole run."""
    check_dataset(prefix, tokenizer.vocab_size)
    t = cfg.train
    sizes = [t.steps * t.global_batch_size, max(1, t.eval_batches) * t.global_batch_size, None]
    ds_cfg = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=cfg.data.seq_len,
        blend=([prefix], None),
        split=cfg.data.split,
        path_to_cache=cfg.data.cache_dir or os.path.join(os.path.dirname(prefix), "cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )

    def build():
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, ds_cfg).build()

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        splits = build()  # writes the sample-index cache once
    if dist.is_initialized():
        dist.barrier()
    if not rank0:
        splits = build()
    train, valid, _ = splits
    if train is None or valid is None:
        raise DataError(f"{prefix}: split '{cfg.data.split}' leaves no train or validation data")
    return SplitReader(train, tokenizer.vocab_size, "train"), \
        SplitReader(valid, tokenizer.vocab_size, "valid")


def micro_batch_start(step: int, micro: int, dp_rank: int, cfg, dp_size: int) -> int:
    t = cfg.train
    return step * t.global_batch_size + micro * t.micro_batch_size * dp_size + \
        dp_rank * t.micro_batch_size
