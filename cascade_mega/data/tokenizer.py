"""Tokenizer: a Hugging Face `tokenizers` BPE with the two special tokens the project needs.

`[MASK]` is the absorbing state of the diffusion; `<|endoftext|>` ends every document (megatron's
`eod`). The object also carries what megatron-core's GPT dataset asks of a tokenizer
(`vocab_size`, `eod`), and no pad token (megatron then uses its own out-of-vocabulary pad id).
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, List

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MASK_TOKEN = "[MASK]"
EOD_TOKEN = "<|endoftext|>"


class CascadeTokenizer:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        self._tok = Tokenizer.from_file(path)
        self.mask_id = self._require(MASK_TOKEN)
        self.eod = self._require(EOD_TOKEN)
        self.vocab_size = self._tok.get_vocab_size()
        # megatron-core keys its sample-index cache on this description
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
        self.unique_identifiers = {"class": type(self).__name__, "sha256": digest}

    def _require(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer {self.path} has no {token} token")
        return idx

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> CascadeTokenizer:
    """Train a byte-level BPE on `texts` and save it to `path`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD_TOKEN, MASK_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    return CascadeTokenizer(path)
