"""The manual points at things that exist: README.md and every page under docs/.

For each of them (fast: no training, no model; the CLI parser is built once):
- every relative markdown link resolves to a file or folder of the repository, and a link's
  `#anchor` names a heading of the page it points at (GitHub's anchors);
- every `cascade <subcommand>` (and `python -m cascade_mega <subcommand>`) written in a code span
  or a code block is a subcommand of `cascade_mega/cli.py`'s parser; where that subcommand takes
  a fixed choice next (`cascade bench noise`, `cascade convert hf-to-mcore`), that too;
- every `make <target>` in code is a target of the Makefile;
- every repository path in code (starting with `cascade_mega/`, `configs/`, `tools/`, `kernels/`,
  `launchers/`, `slurm/`, `tests/` or `docs/`) exists: `file.py:123` and `file.py::test_name` are
  checked as `file.py`, a glob must match something, and placeholders (`<...>`, `...`) are
  skipped;
- the README's GPU venv commands are the ones docs/gpus.md shows.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import re

import pytest

from helpers import ROOT

PREFIXES = ("cascade_mega", "configs", "tools", "kernels", "launchers", "slurm", "tests", "docs")
PATH_RE = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./*<>{}:+-]*)" % "|".join(PREFIXES))
COMMAND_RE = re.compile(r"(?<![\w./-])(?:cascade|-m cascade_mega)[ \t]+([a-z][\w-]*)"
                        r"(?:[ \t]+([a-z][\w-]*)(?![\w./-]))?")
MAKE_RE = re.compile(r"(?<![\w./-])make[ \t]+([a-z][\w-]*)")
LINK_RE = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE_RE = re.compile(r"^(```|~~~)")


def pages():
    found = [os.path.join(ROOT, "README.md")]
    found += sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return found


def _rel(path):
    return os.path.relpath(path, ROOT)


@functools.lru_cache(maxsize=None)
def split(path):
    """(prose lines, code-block lines, code spans), each with its line number."""
    prose, block, spans = [], [], []
    fenced = False
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if FENCE_RE.match(line.lstrip()):
            fenced = not fenced
            continue
        if fenced:
            block.append((number, line))
        else:
            prose.append((number, line))
    # code spans may wrap across lines within a paragraph: join each paragraph first
    paragraph, start = [], None
    for number, line in prose + [(None, "")]:
        if line.strip():
            if start is None:
                start = number
            paragraph.append(line)
            continue
        text = "\n".join(paragraph)
        for match in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
            spans.append((start + text[:match.start()].count("\n"),
                          match.group(2).replace("\n", " ")))
        paragraph, start = [], None
    return prose, block, spans


def code(path):
    _, block, spans = split(path)
    return block + spans


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path):
    prose, _, _ = split(path)
    seen, out = {}, set()
    for _, line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@functools.lru_cache(maxsize=None)
def commands():
    """{subcommand: the choices its first positional takes (None: free)} from the CLI parser."""
    from cascade_mega.cli import build_parser

    def subparsers(parser):
        return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]

    out = {}
    (top,) = subparsers(build_parser())
    for name, parser in top.choices.items():
        nested = subparsers(parser)
        if nested:
            out[name] = set(nested[0].choices)
            continue
        positional = [a for a in parser._actions if not a.option_strings
                      and not isinstance(a, argparse._HelpAction)]
        out[name] = set(positional[0].choices) if positional and positional[0].choices else None
    return out


@functools.lru_cache(maxsize=None)
def make_targets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    return set(re.findall(r"^([a-z][\w-]*)\s*:(?!=)", text, flags=re.M))


def test_the_manual_exists():
    names = {_rel(p) for p in pages()}
    for page in ("training", "data", "parallel", "memory-plan", "generation", "run-directory",
                 "slurm", "tracking", "conversion", "evaluation", "continued-pretraining",
                 "sweeps", "benchmarks", "gpus", "results", "README"):
        assert f"docs/{page}.md" in names, page
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 12 * 1024


@pytest.mark.parametrize("page", pages(), ids=_rel)
def test_links_resolve(page):
    prose, _, _ = split(page)
    bad = []
    for number, line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # a link inside a code span is not a link
        for match in LINK_RE.finditer(line):
            target = match.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) \
                if file_part else page
            where = f"{_rel(page)}:{number}: {target}"
            if not os.path.exists(resolved):
                bad.append(f"{where} (no such file)")
            elif not resolved.startswith(ROOT + os.sep):
                bad.append(f"{where} (outside the repository)")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                bad.append(f"{where} (no heading #{anchor} in {_rel(resolved)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", pages(), ids=_rel)
def test_commands_exist(page):
    known = commands()
    bad = []
    for number, text in code(page):
        for match in COMMAND_RE.finditer(text):
            name, nxt = match.groups()
            where = f"{_rel(page)}:{number}: {match.group(0).strip()}"
            if name not in known:
                bad.append(f"{where} (no subcommand {name!r}; known: {', '.join(sorted(known))})")
            elif known[name] is not None and nxt is not None and nxt not in known[name]:
                bad.append(f"{where} ({nxt!r} is not one of {', '.join(sorted(known[name]))})")
        for match in MAKE_RE.finditer(text):
            if match.group(1) not in make_targets():
                bad.append(f"{_rel(page)}:{number}: make {match.group(1)} (no such target)")
    assert not bad, "\n".join(bad)


def _path_part(token):
    token = token.split("::")[0].split(":")[0]  # file.py:12, file.py::test_x
    return token.rstrip(".,;")


@pytest.mark.parametrize("page", pages(), ids=_rel)
def test_paths_exist(page):
    bad = []
    for number, text in code(page):
        for match in PATH_RE.finditer(text):
            path = _path_part(match.group(1))
            if "<" in path or ">" in path or "..." in path or "{" in path:
                continue  # a placeholder
            where = f"{_rel(page)}:{number}: {path}"
            if "*" in path:
                if not glob.glob(os.path.join(ROOT, path)):
                    bad.append(f"{where} (the glob matches nothing)")
            elif not os.path.exists(os.path.join(ROOT, path)):
                bad.append(f"{where} (no such file or folder)")
    assert not bad, "\n".join(bad)


def _gpu_venv_block(path):
    text = open(path, encoding="utf-8").read()
    return text.split("make gpu-setup ")[1].split("```")[0]


def test_gpu_venv_commands_agree():
    """tests/test_packaging.py checks the README's block against `make gpu-setup`; the docs
    page shows the same block."""
    assert _gpu_venv_block(os.path.join(ROOT, "README.md")) == \
        _gpu_venv_block(os.path.join(ROOT, "docs", "gpus.md"))


def test_the_checks_catch_what_they_should(tmp_path):
    """The scanners find a bad link, command and path in a made-up page."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [x](nowhere.md) and [y](#title) and [z](#nope).\n\n"
                    "Run `cascade trian CONFIG` or `cascade bench nosie`, read\n"
                    "`cascade_mega/nothing.py:12` and `tests/test_docs.py::test_paths_exist`,\n"
                    "skip `configs/<name>.yaml`.\n\n```bash\nmake quickstart\nmake tset\n```\n")
    prose, block, spans = split(str(page))
    links = [m.group(2) for _, line in prose for m in LINK_RE.finditer(line)]
    assert links == ["nowhere.md", "#title", "#nope"]
    assert anchors(str(page)) == {"title"}
    found = [m.groups() for _, t in code(str(page)) for m in COMMAND_RE.finditer(t)]
    assert ("trian", None) in found and ("bench", "nosie") in found
    assert "trian" not in commands() and "nosie" not in commands()["bench"]
    paths = [_path_part(m.group(1)) for _, t in code(str(page)) for m in PATH_RE.finditer(t)]
    assert paths == ["cascade_mega/nothing.py", "tests/test_docs.py", "configs/<name>.yaml"]
    assert [m.group(1) for _, t in block for m in MAKE_RE.finditer(t)] == ["quickstart", "tset"]
    assert "tset" not in make_targets() and "quickstart" in make_targets()
    assert slug("Tracking (MLflow)") == "tracking-mlflow"
    assert slug("Run directory (a public contract)") == "run-directory-a-public-contract"
