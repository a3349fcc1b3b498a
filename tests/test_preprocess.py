"""`cascade preprocess`: text, JSONL and gzip inputs round-trip through the indexed dataset, with
the same bytes for any number of workers; a long line is tokenised in pieces, with the ids of the
whole document."""

import gzip
import json
import os

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from cascade_mega.data.indexed import check_dataset, read_meta
from cascade_mega.data.preprocess import preprocess
from cascade_mega.data.shakespeare import documents as shakespeare_documents
from cascade_mega.data.tokenizer import open_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text: 60 Shakespeare documents, as .txt files, JSONL and their gzip forms."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [d[:3000] for d in list(shakespeare_documents())[:60]]
    # text that spells the special tokens stays text (no mask id, no false document boundary)
    docs[3] += "\nA [MASK] here, and <|endoftext|> there."
    docs[25] = "<|endoftext|>[MASK] " + docs[25]
    txt = []
    for i, d in enumerate(docs[:20]):
        (root / f"doc{i:02d}.txt").write_text(d)
        txt.append(str(root / f"doc{i:02d}.txt"))
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[20:]))
    (root / "part.jsonl").write_text(lines)
    with gzip.open(root / "part.jsonl.gz", "wt") as f:
        f.write(lines)
    with gzip.open(root / "doc00.txt.gz", "wt") as f:
        f.write(docs[0])
    return root, docs, txt


def _read(prefix):
    ds = IndexedDataset(prefix, mmap=True)
    return [ds[i].tolist() for i in range(len(ds))]


def _round_trip(prefix, expected, dtype="uint16"):
    meta = read_meta(prefix)
    tok = open_tokenizer(os.path.join(os.path.dirname(prefix), meta["tokenizer"]))
    check_dataset(prefix, tok.vocab_size)
    assert read_meta(prefix)["mask_tokens"] == 0
    got = _read(prefix)
    assert len(got) == len(expected)
    for ids, text in zip(got, expected):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]  # one boundary per document
        assert tok.mask_id not in ids
        assert tok.decode(ids[:-1]) == text
    assert meta["dtype"] == dtype


def test_round_trip_and_identical_bytes_for_any_worker_count(corpus, tmp_path):
    root, docs, txt = corpus
    inputs = txt + [str(root / "part.jsonl")]
    one = preprocess(inputs, str(tmp_path / "w1" / "ds"), train_bpe_size=500, quiet=True)
    _round_trip(one["prefixes"][0], docs)
    tokenizer = str(tmp_path / "w1" / "ds.tokenizer.json")
    two = preprocess(inputs, str(tmp_path / "w2" / "ds"), tokenizer=tokenizer, workers=2,
                     quiet=True)
    for ext in (".bin", ".idx"):
        assert (tmp_path / "w1" / f"ds{ext}").read_bytes() == \
            (tmp_path / "w2" / f"ds{ext}").read_bytes()
    assert one["documents"] == two["documents"] == 60 and one["tokens"] == two["tokens"]


def test_gzip_inputs_equal_plain_ones(corpus, tmp_path):
    root, docs, _ = corpus
    tokenizer = preprocess([str(root / "doc00.txt")], str(tmp_path / "tok" / "ds"),
                           train_bpe_size=400, quiet=True)["prefixes"][0] + ".tokenizer.json"
    plain = preprocess([str(root / "doc00.txt"), str(root / "part.jsonl")],
                       str(tmp_path / "plain" / "ds"), tokenizer=tokenizer, quiet=True)
    zipped = preprocess([str(root / "doc00.txt.gz"), str(root / "part.jsonl.gz")],
                        str(tmp_path / "gz" / "ds"), tokenizer=tokenizer, quiet=True)
    assert _read(plain["prefixes"][0]) == _read(zipped["prefixes"][0])
    _round_trip(zipped["prefixes"][0], [docs[0]] + docs[20:])


def test_shards_split_the_documents_in_order(corpus, tmp_path):
    root, docs, _ = corpus
    stats = preprocess([str(root / "part.jsonl")], str(tmp_path / "ds"), train_bpe_size=400,
                       shard_tokens=5000, quiet=True)
    assert len(stats["prefixes"]) > 2
    joined = [ids for p in stats["prefixes"] for ids in _read(p)]
    assert len(joined) == 40 and sum(map(len, joined)) == stats["tokens"]


def test_cli_reports_throughput_and_names_bad_inputs(corpus, tmp_path):
    root, _, _ = corpus
    from helpers import cascade

    cmd = ["preprocess", str(root / "part.jsonl.gz"), "--output-prefix", str(tmp_path / "ds"),
           "--train-bpe", "400", "--workers", "2", "--json"]
    proc = cascade(*cmd)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.splitlines()[-1])
    assert stats["documents"] == 40 and stats["tokens_per_s"] > 0
    assert "tokens/s" in proc.stderr  # the progress line
    bad = cascade(*cmd[:1], str(tmp_path / "missing.jsonl"), *cmd[2:])
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    bad = cascade(*cmd[:1], str(tmp_path / "nokey.jsonl"), *cmd[2:])
    assert bad.returncode == 2 and "no field 'text'" in bad.stderr


def test_qwen_vocabulary_writes_int32_ids_and_round_trips(corpus, tmp_path):
    """Qwen's 151,643-entry tiktoken vocabulary (plus the project's special tokens): ids beyond
    uint16, so the dataset is int32; training finds the vocabulary recorded beside it."""
    from types import SimpleNamespace

    from cascade_mega.data import loader

    root, docs, _ = corpus
    one = preprocess([str(root / "part.jsonl.gz")], str(tmp_path / "w1" / "ds"),
                     tokenizer="qwen", quiet=True)
    preprocess([str(root / "part.jsonl.gz")], str(tmp_path / "w2" / "ds"),
               tokenizer="qwen", workers=2, quiet=True)
    assert (tmp_path / "w1" / "ds.bin").read_bytes() == (tmp_path / "w2" / "ds.bin").read_bytes()
    _round_trip(one["prefixes"][0], docs[20:], dtype="int32")
    tok = loader.load_tokenizer(SimpleNamespace(tokenizer=None), one["prefixes"][0])
    assert tok.vocab_size == 151852 and tok.eod == 151643
    assert tok.encode("Hello world") == [9707, 1879]  # Qwen's own ids
    assert max(max(ids) for ids in _read(one["prefixes"][0])) > 65535


@pytest.mark.parametrize("specials,eod_name", [([], "<|endoftext|>"), (["</s>"], "</s>")])
def test_a_foreign_tokenizer_gets_the_projects_special_tokens(tmp_path, specials, eod_name):
    """A tokenizer.json from elsewhere (no [MASK], maybe its own end-of-text token): the missing
    tokens are appended after its vocabulary, with the same ids on every load."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["to be or not to be"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "hf").mkdir()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    base = tok.get_vocab_size()
    first = open_tokenizer(str(tmp_path / "hf" / "tokenizer.json"))
    again = open_tokenizer(str(tmp_path / "hf" / "tokenizer.json"))
    assert first.mask_id == again.mask_id == first.vocab_size - 1 >= base
    assert first.eod == again.eod == (first.vocab_size - 2 if not specials else 0)
    assert first.decode([first.eod]) == eod_name
    (tmp_path / "doc.txt").write_text("to be or not")
    stats = preprocess([str(tmp_path / "doc.txt")], str(tmp_path / "ds"),
                       tokenizer=str(tmp_path / "hf"), quiet=True)
    assert _read(stats["prefixes"][0])[0][-1] == first.eod


def test_mediawiki_dump_gives_one_document_per_article(corpus, tmp_path):
    import bz2
    from xml.sax.saxutils import escape

    _, docs, _ = corpus
    pages = [("Hamlet", "0", False, docs[0]), ("Talk:Hamlet", "1", False, "talk page"),
             ("Prince of Denmark", "0", True, "#REDIRECT [[Hamlet]]"),
             ("Macbeth & <co>", "0", False, docs[1] + "\n{{Infobox play}} [[link|text]]")]
    xml = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo/>']
    for title, ns, redirect, text in pages:
        xml.append(f"<page><title>{escape(title)}</title><ns>{ns}</ns>"
                   + ('<redirect title="Hamlet"/>' if redirect else "")
                   + f"<revision><text>{escape(text)}</text></revision></page>")
    dump = tmp_path / "enwiki-pages-articles1.xml-p10p30302-shortened.bz2"  # as dumps are named
    dump.write_bytes(bz2.compress(("".join(xml) + "</mediawiki>").encode()))
    out = preprocess([str(dump)], str(tmp_path / "wiki" / "ds"), train_bpe_size=400,
                     workers=2, quiet=True)
    _round_trip(out["prefixes"][0], [f"Hamlet\n\n{docs[0]}",
                                     f"Macbeth & <co>\n\n{pages[3][3]}"])


def test_megatron_style_tool_runs_from_a_source_checkout(corpus, tmp_path):
    """`tools/preprocess_data.py` with Megatron's flags, from a copy of the sources: one dataset
    per JSON key, named PREFIX_KEY_document like Megatron's; the kernels and launchers resolve
    under the names the library imports them by."""
    from helpers import run_python, source_checkout

    root, docs, _ = corpus
    src = source_checkout(tmp_path / "src")
    names = run_python("-c", "import cascade_mega, cascade_kernels.tiled, "
                       "cascade_launchers.torchrun as t; print(cascade_mega.__file__); "
                       "print(t.__file__)", cwd=src)
    assert names.returncode == 0, names.stderr
    assert all(line.startswith(src) for line in names.stdout.split())
    tok = preprocess([str(root / "part.jsonl")], str(tmp_path / "bpe" / "ds"),
                     train_bpe_size=400, quiet=True)
    tokenizer = str(tmp_path / "bpe" / "ds.tokenizer.json")
    lines = [json.dumps({"text": d, "title": f"title {i}"}) for i, d in enumerate(docs[20:30])]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_python("tools/preprocess_data.py", "--input", tmp_path / "x.jsonl",
                      "--json-keys", "text", "title", "--output-prefix", tmp_path / "out",
                      "--tokenizer-model", tokenizer, "--workers", "1", cwd=src)
    assert proc.returncode == 0, proc.stderr
    _round_trip(str(tmp_path / "out_text_document"), docs[20:30])
    _round_trip(str(tmp_path / "out_title_document"), [f"title {i}" for i in range(10)])
    assert tok["documents"] == 40
    bad = run_python("tools/preprocess_data.py", "--input", tmp_path / "x.jsonl", "--json-keys",
                     "body", "--output-prefix", tmp_path / "bad", "--tokenizer-model",
                     tokenizer, cwd=src)
    assert bad.returncode == 2 and "no field 'body'" in bad.stderr


@pytest.mark.parametrize("lines", [False, True])
def test_a_long_line_is_tokenised_in_pieces_with_the_whole_documents_ids(corpus, tmp_path,
                                                                         monkeypatch, capfd,
                                                                         lines):
    """One line of about 300 KB (tokenised whole, such a line once cost ~150x its size): read and
    tokenised in pieces of at most `piece_chars` characters, cut where the ids stay the whole
    text's, it gives exactly the ids of the whole document. The progress output, when stderr is
    no terminal, is whole lines (no carriage return) ending with a newline; on a terminal, one
    line rewritten in place, ended with a newline."""
    import io
    import sys

    from cascade_mega.data import tokenize_worker

    _, docs, _ = corpus
    # between the plays: runs of spaces, a tab, digits, non-ASCII letters
    mixed = " 1609  \u00e6\u00f8 caf\u00e9\t\u65e5\u672c\u8a9e, 12345.  "
    line = mixed.join(" ".join(d.split()) for d in docs * 2)
    assert len(line) > 300_000 and "\n" not in line
    (tmp_path / "line.txt").write_text(line + "\n")
    tokenizer = preprocess([str(tmp_path / "line.txt")], str(tmp_path / "tok" / "ds"),
                           train_bpe_size=400, quiet=True)["prefixes"][0] + ".tokenizer.json"
    tok = open_tokenizer(tokenizer)
    sizes = []
    real = tokenize_worker.encode
    monkeypatch.setattr(tokenize_worker, "encode",
                        lambda pieces: (sizes.extend(len(t) for t, _ in pieces), real(pieces))[1])
    capfd.readouterr()
    out = preprocess([str(tmp_path / "line.txt")], str(tmp_path / "ds"), tokenizer=tokenizer,
                     lines=lines, piece_chars=500)
    assert len(sizes) > 600 and max(sizes) <= 500  # in pieces, each at most piece_chars
    whole = line if lines else line + "\n"
    assert _read(out["prefixes"][0]) == [tok.encode(whole) + [tok.eod]]
    err = capfd.readouterr().err
    assert "tokens/s" in err and err.endswith("\n") and "\r" not in err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    preprocess([str(tmp_path / "line.txt")], str(tmp_path / "tty"), tokenizer=tokenizer,
               lines=lines, piece_chars=500)
    shown = sys.stderr.getvalue()
    assert shown.startswith("\rpreprocess: ") and shown.endswith(" tokens/s\n")
    assert shown.count("\n") == 1
