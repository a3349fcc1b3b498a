"""Train / validation samples through megatron-core's GPT dataset, indexed deterministically.

Global batch g, micro-batch m, data-parallel rank r read samples
    g * GBS + m * (MBS * DP) + r * MBS + [0, MBS)
so a run resumed at step k reads exactly the samples an uninterrupted run would (no sampler state
to save), and every DP rank reads its own share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from cascade_mega.data import shakespeare
from cascade_mega.data.indexed import DataError, check_dataset, read_meta
from cascade_mega.data.tokenizer import CascadeTokenizer, open_tokenizer


def resolve_path(path: str) -> str:
    """`data.path` with the builtin corpus built (once) and replaced by its prefix."""
    if path == "builtin:shakespeare":
        return shakespeare.ensure_dataset()
    return path


def blend(path: str):
    """(prefixes, weights or None) of `data.path`: one prefix, or Megatron's weighted list
    "W1 PREFIX1 W2 PREFIX2 ..." (weights are normalised by the dataset builder)."""
    parts = path.split()
    if len(parts) <= 1:
        return parts, None
    try:
        weights = [float(w) for w in parts[0::2]]
    except ValueError:
        weights = []
    if len(parts) % 2 or len(weights) != len(parts) // 2 or min(weights) <= 0:
        raise DataError(f"data.path {path!r}: expected one prefix, or positive-weight / prefix "
                        "pairs like '0.7 data/a_text_document 0.3 data/b_text_document'")
    return parts[1::2], weights


def _recorded_tokenizer(prefix: str):
    meta = read_meta(prefix)
    return os.path.join(os.path.dirname(prefix), meta["tokenizer"]), meta


def load_tokenizer(data_cfg, path: str) -> CascadeTokenizer:
    """The tokenizer every dataset of `path` was made with (refusing a mix, or a different
    `data.tokenizer`)."""
    prefixes, _ = blend(path)
    recorded, meta = _recorded_tokenizer(prefixes[0])
    text = open(recorded, "rb").read()
    for other in prefixes[1:]:
        other_tok, _ = _recorded_tokenizer(other)
        if open(other_tok, "rb").read() != text:
            raise DataError(f"{other}: tokenised with {other_tok}, unlike {prefixes[0]} "
                            f"({recorded}): a blend needs one tokenizer")
    chosen = data_cfg.tokenizer or recorded
    tok = open_tokenizer(chosen)
    if tok.vocab_size != meta["vocab_size"] or (
            data_cfg.tokenizer and open(chosen, "rb").read() != text):
        raise DataError(f"{prefixes[0]}: dataset was tokenised with {recorded}, not with {chosen}")
    return tok


@dataclass
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor


class SplitReader:
    """One split's samples; `documents` / `tokens`: what the split holds (for the start line)."""

    def __init__(self, dataset: GPTDataset, vocab_size: int, name: str, documents: int = 0,
                 tokens: int = 0):
        self.dataset, self.vocab_size, self.name = dataset, vocab_size, name
        self.documents, self.tokens = documents, tokens

    def micro_batch(self, start: int, size: int) -> Batch:
        n = len(self.dataset)
        items = [self.dataset[(start + i) % n] for i in range(size)]
        tokens = torch.stack([it["tokens"] for it in items])
        labels = torch.stack([it["labels"] for it in items])
        top = int(max(tokens.max(), labels.max()))
        if top >= self.vocab_size:
            where = getattr(self.dataset, "dataset_path", None) or f"the {self.name} blend"
            raise DataError(f"{where}: token id {top} is beyond the "
                            f"vocabulary ({self.vocab_size} entries)")
        return Batch(tokens, labels, torch.stack([it["loss_mask"] for it in items]))


def build_splits(cfg, tokenizer: CascadeTokenizer, path: str, dp_size: int):
    """(train, valid) SplitReaders sized for the whole run; `path` as `blend` reads it."""
    prefixes, weights = blend(path)
    for prefix in prefixes:
        check_dataset(prefix, tokenizer.vocab_size)
    prefix = prefixes[0]
    t = cfg.train
    sizes = [t.steps * t.global_batch_size, max(1, t.eval_batches) * t.global_batch_size, 0]
    ds_cfg = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=cfg.data.seq_len,
        blend=(prefixes, weights),
        split=cfg.data.split,
        path_to_cache=cfg.data.cache_dir or os.path.join(os.path.dirname(prefix), "cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )

    train_docs = train_tokens = 0
    for prefix in prefixes:
        docs, tokens = _split_sizes(prefix, ds_cfg.split_matrix, cfg.data)
        train_docs, train_tokens = train_docs + docs, train_tokens + tokens

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
        raise DataError(f"{path}: split '{cfg.data.split}' leaves no train or validation data")
    return SplitReader(train, tokenizer.vocab_size, "train", train_docs, train_tokens), \
        SplitReader(valid, tokenizer.vocab_size, "valid")


def _split_sizes(prefix: str, split_matrix, data_cfg) -> tuple:
    """(documents, tokens) of the train split. Each split training reads (train, validation)
    must hold at least one sample: megatron cuts the split by documents and would loop forever
    looking for tokens in an empty one."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    lengths = numpy.array(ds.sequence_lengths, dtype=numpy.int64)  # a copy: the map closes with ds
    need = data_cfg.seq_len + 1
    sizes = []
    for name, bounds in zip(("train", "validation"), split_matrix[:2]):
        if bounds is None:
            sizes.append((0, 0))
            continue
        beg, end = (int(round(b * float(len(lengths)))) for b in bounds)
        tokens = int(lengths[beg:end].sum())
        sizes.append((end - beg, tokens))
        if tokens < need:
            raise DataError(f"{prefix}: data.split '{data_cfg.split}' leaves the {name} split "
                            f"{end - beg} of {len(lengths)} documents ({tokens} tokens), fewer than "
                            f"one sample of data.seq_len + 1 = {need} tokens: give it more "
                            "documents or change data.split")
    return sizes[0]


def micro_batch_start(step: int, micro: int, dp_rank: int, cfg, dp_size: int) -> int:
    t = cfg.train
    return step * t.global_batch_size + micro * t.micro_batch_size * dp_size + \
        dp_rank * t.micro_batch_size


def run_tokenizer(cfg, run_dir: str) -> CascadeTokenizer:
    """The tokenizer a run was made with: the one its config names (a converted model has no
    dataset), else the run directory's own copy (`keep_with_run`), else its dataset's."""
    own = os.path.join(run_dir, "tokenizer.json")
    if cfg.data.tokenizer or os.path.isfile(own):
        return open_tokenizer(cfg.data.tokenizer or own)
    return load_tokenizer(cfg.data, resolve_path(cfg.data.path))


def keep_with_run(tokenizer, path: str, run_dir: str) -> None:
    """The run directory stands alone: its tokenizer (`tokenizer.json`, what decoding, export and
    evaluation read) and each dataset's `.meta.json` (under `data/`) are copied into it, so they
    never need the dataset, or a rebuilt built-in corpus, again."""
    import shutil

    own = os.path.join(run_dir, "tokenizer.json")
    if os.path.abspath(tokenizer.path) != os.path.abspath(own):
        shutil.copyfile(tokenizer.path, own + ".tmp")
        os.replace(own + ".tmp", own)
    prefixes, _ = blend(path)
    os.makedirs(os.path.join(run_dir, "data"), exist_ok=True)
    for prefix in prefixes:
        if os.path.isfile(prefix + ".meta.json"):
            shutil.copyfile(prefix + ".meta.json",
                            os.path.join(run_dir, "data", os.path.basename(prefix) + ".meta.json"))
