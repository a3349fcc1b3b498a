"""Blended datasets (`data.path: "W1 PREFIX1 W2 PREFIX2"`) through megatron-core's builder."""

import pytest
import torch

from cascade_mega.config import load_config
from cascade_mega.data import loader
from cascade_mega.data.indexed import DataError
from cascade_mega.data.preprocess import preprocess


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two corpora with disjoint vocabularies under one tokenizer: a sample's tokens tell its
    source."""
    root = tmp_path_factory.mktemp("blend")
    (root / "a.txt").write_text(("alpha beta gamma delta " * 400 + "\n") * 1)
    (root / "b.txt").write_text(("0123 4567 89 " * 400 + "\n") * 1)
    (root / "both.txt").write_text((root / "a.txt").read_text() + (root / "b.txt").read_text())
    tok = preprocess([str(root / "both.txt")], str(root / "tok" / "x"), train_bpe_size=300,
                     quiet=True)["prefixes"][0] + ".tokenizer.json"
    prefixes = {}
    for name in ("a", "b"):
        # many small documents so the sample index has room to mix
        lines = (root / f"{name}.txt").read_text().split(" ")
        (root / f"{name}_docs.txt").write_text("\n".join(" ".join(lines[i:i + 40])
                                                         for i in range(0, len(lines), 40)))
        prefixes[name] = preprocess([str(root / f"{name}_docs.txt")], str(root / name / "ds"),
                                    tokenizer=tok, lines=True, quiet=True)["prefixes"][0]
    return prefixes


def test_blend_proportions_follow_the_weights(megatron, two_sources, tmp_path):
    path = f"0.7 {two_sources['a']} 0.3 {two_sources['b']}"
    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.path={path}", "data.seq_len=32",
                             "train.steps=50", "train.global_batch_size=8",
                             "train.micro_batch_size=8", "optimizer.warmup_steps=1",
                             f"data.cache_dir={tmp_path}/cache"])
    tok = loader.load_tokenizer(cfg.data, path)
    train, _ = loader.build_splits(cfg, tok, path, 1)
    a_ids = set(tok.encode("alpha beta gamma delta"))
    batch = train.micro_batch(0, 400).tokens
    from_a = torch.tensor([bool(set(row.tolist()) & a_ids) for row in batch]).float().mean()
    assert abs(float(from_a) - 0.7) < 0.05


def test_blend_path_errors_name_the_problem(two_sources):
    with pytest.raises(DataError, match="weight / prefix"):
        loader.blend(f"0.7 {two_sources['a']} {two_sources['b']}")
    with pytest.raises(DataError, match="weight / prefix"):
        loader.blend(f"-1 {two_sources['a']} 1 {two_sources['b']}")
    assert loader.blend(two_sources["a"]) == ([two_sources["a"]], None)
