"""megatron-core indexed datasets (.bin/.idx) written with the tokenizer recorded beside them.

`<prefix>.meta.json` records the tokenizer file and vocabulary size and the largest token id, so
training can refuse a dataset made with another tokenizer, or holding ids beyond the vocabulary,
before any model is built.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from cascade_mega.errors import UserError


class DataError(UserError, ValueError):
    """A dataset the run cannot use; the message names the file."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def write_indexed(prefix: str, documents, tokenizer) -> None:
    """Each document a list of token ids."""
    write_pieces(prefix, ((ids, True) for ids in documents), tokenizer)


def write_pieces(prefix: str, pieces, tokenizer) -> None:
    """Documents arriving in pieces, `(ids, last)`: a document's pieces in order, `last` on its
    final one. Each document is one sequence of the index, as `add_document` writes it (the same
    bytes), but its ids are written as they come: what is held is one piece, never a document
    (the builder's own list of sequence lengths grows by one entry a document)."""
    dtype = token_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    max_id, masked, length = -1, 0, 0
    mask_id = getattr(tokenizer, "mask_id", None)
    for ids, last in pieces:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size:
            max_id = max(max_id, int(arr.max()))
            masked += int((arr == mask_id).sum()) if mask_id is not None else 0
            builder.data_file.write(arr.astype(dtype).tobytes(order="C"))
        length += arr.size
        if last:  # add_document's bookkeeping, for a document written piece by piece
            builder.sequence_lengths.append(length)
            builder.document_indices.append(len(builder.sequence_lengths))
            length = 0
    builder.finalize(prefix + ".idx")
    tok_copy = prefix + (".tiktoken" if tokenizer.path.endswith(".tiktoken") else
                         ".tokenizer.json")
    if os.path.abspath(tokenizer.path) != os.path.abspath(tok_copy):
        shutil.copyfile(tokenizer.path, tok_copy)
    with open(prefix + ".meta.json", "w") as f:
        json.dump({"tokenizer": os.path.basename(tok_copy), "vocab_size": tokenizer.vocab_size,
                   "max_token_id": max_id, "dtype": np.dtype(dtype).name,
                   "mask_tokens": masked}, f)


def read_meta(prefix: str) -> dict:
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"dataset file not found: {prefix + ext}")
    path = prefix + ".meta.json"
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: the dataset does not record its tokenizer "
                        "(write it with the project's preprocessing)")
    with open(path) as f:
        return json.load(f)


def check_dataset(prefix: str, vocab_size: int) -> None:
    """Structural checks of .bin/.idx and the token-id range, with the file named."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    class Checked(IndexedDataset):
        def __del__(self):  # megatron's assumes a whole object: a failed open prints a traceback
            for name in ("bin_reader", "index"):
                self.__dict__.pop(name, None)

    meta = read_meta(prefix)
    try:
        ds = Checked(prefix, mmap=True)
    except Exception as err:  # megatron raises AssertionError/ValueError on a corrupt .idx
        raise DataError(f"{prefix}.idx cannot be read: {err}") from None
    expected = int(ds.index.sequence_pointers[-1]) + int(ds.index.sequence_lengths[-1]) * \
        ds.index.dtype_size if len(ds) else 0
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(f"{prefix}.bin has {actual} bytes but its .idx describes {expected}: "
                        "truncated or mismatched")
    if meta.get("mask_tokens"):  # the diffusion's absorbing state, as data: an infinite loss
        raise DataError(f"{prefix}.bin holds the mask token {meta['mask_tokens']} times: a "
                        "target no model can predict (re-preprocess: text that spells a special "
                        "token is encoded as text)")
    if meta["max_token_id"] >= vocab_size:
        raise DataError(f"{prefix}.bin holds token id {meta['max_token_id']} but the vocabulary "
                        f"has {vocab_size} entries")
