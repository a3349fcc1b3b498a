"""Tokenising worker for `cascade preprocess`: imports only the tokenizer (workers start fast).

Each worker tokenises with one thread; the pool is the parallelism (the Rust tokenizer's own
threads would oversubscribe the cores).
"""

from __future__ import annotations

import os

_tokenizer = None


def init(path: str, single_thread: bool = True) -> None:
    global _tokenizer
    if single_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from cascade_mega.data.tokenizer import open_tokenizer

    _tokenizer = open_tokenizer(path)


def encode(texts):
    """Documents -> (token ids ending with end-of-document, bytes of text)."""
    tok = _tokenizer
    return [ids + [tok.eod] for ids in tok.encode_batch(texts)], \
        sum(len(t.encode()) for t in texts)
