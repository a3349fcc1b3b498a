"""Tokenising worker for `cascade preprocess`: imports only the tokenizer (workers start fast).

Each worker tokenises with one thread; the pool is the parallelism (the Rust tokenizer's own
threads would oversubscribe the cores). A task is a list of text pieces, `(text, last)`: a whole
document, or a part of a long one cut where the ids stay those of the whole (`tokenizer.SAFE_CUT`),
`last` on a document's final piece. The ids come back as int32 arrays (4 bytes a token, where a
list of Python ints takes about 36), so a task's result is small to hold and to send back.
"""

from __future__ import annotations

import os

import numpy as np

_tokenizer = None


def init(path: str, single_thread: bool = True) -> None:
    global _tokenizer
    if single_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from cascade_mega.data.tokenizer import open_tokenizer

    _tokenizer = open_tokenizer(path)


def encode(pieces):
    """[(text, last)] -> ([(ids, last)], bytes of text); a document's last piece ends with the
    end-of-document token."""
    tok = _tokenizer
    ids = tok.encode_batch([text for text, _ in pieces])
    out = [(np.array(i + [tok.eod] if last else i, dtype=np.int32), last)
           for i, (_, last) in zip(ids, pieces)]
    return out, sum(len(text.encode()) for text, _ in pieces)
