"""Megatron-LM's `tools/preprocess_data.py`, over this project's preprocessing (`cascade
preprocess`, `cascade_mega/data/preprocess.py`), with Megatron's flags and file names:

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --output-prefix data/corpus --tokenizer-model tokenizer.json --workers 8

writes `data/corpus_text_document.{bin,idx}` (one dataset per JSON key, Megatron's naming), the
prefix to give as `data.path`. Documents always end with the end-of-document token (Megatron's
`--append-eod`, which `data.document_mask` needs). Runs from a source checkout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+",
                   help=".jsonl / .txt files or MediaWiki .xml dumps, optionally .gz / .bz2")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSONL fields to write, one dataset each (default: text)")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX_KEY_document.bin/.idx for each key")
    p.add_argument("--tokenizer-model", required=True,
                   help="tokenizer.json or a directory holding one, a .tiktoken vocabulary, or "
                        "'qwen'")
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   choices=("HuggingFaceTokenizer", "TikTokenizer"),
                   help="kept for Megatron command lines; the file type decides")
    p.add_argument("--append-eod", action="store_true",
                   help="always on here (documents end with the end-of-document token)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--lines", action="store_true", help=".txt: one document per line")
    p.add_argument("--json", action="store_true", help="end with one JSON line of statistics")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from cascade_mega.cli import main as cascade

    for key in args.json_keys:
        line = ["preprocess", *args.input, "--output-prefix",
                f"{args.output_prefix}_{key}_document", "--tokenizer", args.tokenizer_model,
                "--json-key", key, "--workers", str(args.workers)]
        status = cascade(line + ["--lines"] * args.lines + ["--json"] * args.json)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
