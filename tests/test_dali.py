"""`data.backend=dali`: DALI (on CPU, device_id=None) yields the default backend's samples, per
data-parallel rank, and resumes from its own pipeline checkpoint on the exact next batch."""

import json

import pytest
import torch

from helpers import TINY_MODEL, train

from cascade_mega.config import load_config
from cascade_mega.data import loader
from cascade_mega.data.dali_loader import DaliReader
from cascade_mega.data.indexed import DataError


def _cfg(run_dir, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", *TINY_MODEL, "train.steps=6", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.log_interval=1", "train.eval_interval=0",
        "optimizer.warmup_steps=2", "checkpoint.interval=100", "tracking.enabled=false", *extra])


@pytest.fixture(scope="module")
def splits(data_home, tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("dali"))
    prefix = loader.resolve_path(cfg.data.path)
    tok = loader.load_tokenizer(cfg.data, prefix)
    return cfg, tok, loader.build_splits(cfg, tok, prefix, 2)[0]


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_same_samples_as_the_default_backend(splits, dp_rank):
    cfg, tok, default = splits
    dp_size, num_micro = 2, 2  # 8 = 2 micro-batches x 2 samples x 2 ranks
    dali = DaliReader(default.dataset, cfg, tok.vocab_size, dp_rank, dp_size, num_micro, 1)
    seen = set()
    for step in range(1, 4):
        for m in range(num_micro):
            start = loader.micro_batch_start(step, m, dp_rank, cfg, dp_size)
            a, b = default.micro_batch(start, 2), dali.micro_batch(start, 2)
            for x, y in ((a.tokens, b.tokens), (a.labels, b.labels), (a.loss_mask, b.loss_mask)):
                assert torch.equal(x, y)
            seen.add(start)
    assert len(seen) == 6  # distinct samples each micro-batch
    with pytest.raises(DataError, match="training order"):
        dali.micro_batch(0, 2)  # not the next batch


def _run(cfg):
    trainer, records = train(cfg)
    return trainer, [(r["step"], r["loss"]) for r in records]


def test_resume_from_the_dali_checkpoint_is_exact(megatron, tmp_path):
    _, straight = _run(_cfg(tmp_path / "straight", "data.backend=dali"))
    _, default = _run(_cfg(tmp_path / "default"))
    assert straight == default  # same samples, same losses
    _run(_cfg(tmp_path / "stopped", "data.backend=dali", "train.exit_interval=3"))
    state = tmp_path / "stopped" / "checkpoints" / "iter_0000003" / "dali"
    assert json.loads((state / "rank0.json").read_text())["iterations"] == 3 * 4
    assert (state / "rank0.cpt").stat().st_size > 0
    trainer, resumed = _run(_cfg(tmp_path / "stopped", "data.backend=dali"))
    assert trainer.train_data.first_step == 0  # restored through DALI's checkpoint
    assert resumed == straight


def test_state_saved_at_another_data_parallel_size_starts_fresh(splits, tmp_path):
    """A DALI checkpoint written at DP = 1 does not fit DP = 2: the reader starts a new pipeline at
    the resumed step, which reads the default backend's samples for that step."""
    cfg, tok, default = splits
    saved = DaliReader(default.dataset, cfg, tok.vocab_size, 0, 1, 4, 0)
    for m in range(4):
        saved.micro_batch(loader.micro_batch_start(0, m, 0, cfg, 1), 2)
    saved.save_state(str(tmp_path / "dali"))
    for rank in (0, 1):
        resumed = DaliReader(default.dataset, cfg, tok.vocab_size, rank, 2, 2, 1,
                             state_dir=str(tmp_path / "dali"))
        assert resumed.first_step == 1
        start = loader.micro_batch_start(1, 0, rank, cfg, 2)
        assert torch.equal(resumed.micro_batch(start, 2).tokens, default.micro_batch(start, 2).tokens)
