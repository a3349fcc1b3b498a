"""The data-driven clipped schedule (`diffusion.schedule_search`,
train/callbacks/schedule_search.py) in a real Trainer: its variances against the same held-out
batches and draws scored here, one forward each; the range it picks is the argmin, training then
draws inside it, and a resume reads back the choice made before its step."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from cascade_mega.config import load_config
from cascade_mega.diffusion import objective
from cascade_mega.diffusion.base import noise_generator
from helpers import score

CANDIDATES = [[0.0, 1.0], [0.2, 0.8], [0.5, 0.55]]


def test_search_picks_the_least_varying_range_and_training_follows_it(megatron, tmp_path):
    from cascade_mega.train.callbacks import schedule_search
    from cascade_mega.train.trainer import Trainer

    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "model.num_layers=2", "model.hidden_size=64",
        "model.num_attention_heads=4", "data.seq_len=32", "diffusion.block_size=4",
        "train.steps=4", "train.micro_batch_size=4", "train.global_batch_size=4",
        "optimizer.warmup_steps=1", "tracking.enabled=false", "train.eval_interval=0",
        "train.resume=none", "diffusion.schedule_search.interval=2",
        f"diffusion.schedule_search.candidates={CANDIDATES}",
        "diffusion.schedule_search.batches=2", "diffusion.schedule_search.draws=3"])
    trainer = Trainer(cfg, []).setup()
    trainer.train_step(0)
    trainer.train_step(1)
    got = schedule_search.search(trainer, 2)

    model, mask_id = trainer.chunks[0], trainer.tokenizer.mask_id
    want = {}
    for lo, hi in CANDIDATES:
        per_batch = []
        for i in range(2):
            batch = trainer.valid_data.micro_batch(i * 4, 4)
            losses = []
            for k in range(3):
                noise = objective.draw_noise(cfg, 4, noise_generator(
                    cfg.train.seed, "schedule-search", 2, i, k), objective.train_range(cfg, (lo, hi)))
                prep = objective.prepare(batch.tokens, batch.labels, batch.loss_mask, cfg,
                                         mask_id, noise, eod_id=trainer.tokenizer.eod)
                with torch.no_grad():
                    ce, _ = score(model, prep)
                losses.append(float((ce.double() * prep.weight).sum()) / prep.num_tokens)
            mean = sum(losses) / 3
            per_batch.append(sum((x - mean) ** 2 for x in losses) / 2)
        want[f"{lo:g}-{hi:g}"] = sum(per_batch) / 2
    for name, value in want.items():
        assert math.isclose(got[f"schedule_var/{name}"], value, rel_tol=1e-6), name
    assert max(want.values()) > 1.5 * min(want.values())  # a choice, not a tie
    lo, hi = (float(x) for x in min(want, key=want.get).split("-"))
    assert (got["schedule_t_min"], got["schedule_t_max"]) == (lo, hi)
    t = trainer.objective.draw(cfg, "train", 2).t
    assert bool(((t > lo) & (t <= hi)).all())
    assert trainer.objective.metrics(objective.LossSums(*[torch.tensor(1.0)] * 8),
                                     train=True).get("nelbo") is None  # clipped: no bound

    path = tmp_path / "run" / schedule_search.FILE
    assert json.loads(path.read_text())["chosen"] == [lo, hi]
    trainer.objective.use_noise_range(None)  # as a resumed run's objective starts
    resumed = SimpleNamespace(run_dir=str(tmp_path / "run"), start_step=2,
                              objective=trainer.objective)
    schedule_search.restore(resumed)
    assert trainer.objective.clip == (lo, hi)
    trainer.objective.use_noise_range(None)
    earlier = SimpleNamespace(run_dir=str(tmp_path / "run"), start_step=1,
                              objective=trainer.objective)
    schedule_search.restore(earlier)  # a resume from before the search: the configured range
    assert trainer.objective.clip is None and path.read_text() == ""


def _simulated_search(overrides, searches):
    """How often the search (its own criterion, `schedule_search.variances`, on the project's
    draws) picks each candidate, in a simulation where a masked token's cross-entropy is its
    difficulty (fixed per batch and position, Gamma(2, 1)) times (0.5 + t): the loss estimate of
    batch i under `noise` is sum_masked (1/t) d (0.5 + t) / tokens. Also returns the candidates'
    variances measured with 64 batches x 64 draws (the truth the searches estimate)."""
    from cascade_mega.train.callbacks.schedule_search import variances
    from helpers import tiny_cfg

    base = ("data.seq_len=64", "diffusion.block_size=4", "train.global_batch_size=8",
            "train.micro_batch_size=8")
    difficulty = torch.distributions.Gamma(2.0, 1.0).sample((64, 8, 64)).double()

    def loss_sums(i, noise):
        t, masked = noise.t[:, 0], noise.u[:, 0] < noise.t[:, 0]
        per_token = torch.where(masked, difficulty[i] * (0.5 + t) / t, 0.0)
        return float(per_token.sum()), difficulty[i].numel()

    truth = variances(tiny_cfg(*base, "diffusion.schedule_search.batches=64",
                               "diffusion.schedule_search.draws=64"), 10**6, loss_sums)
    cfg = tiny_cfg(*base, *overrides)
    picks = [int(variances(cfg, step, loss_sums).argmin()) for step in range(searches)]
    return truth, torch.bincount(torch.tensor(picks), minlength=len(truth))


def test_the_default_search_picks_the_least_varying_range_in_nine_searches_of_ten():
    """Power (issue: 2 batches x 4 draws found the best range in 58 % of searches): the
    defaults pick the lowest-variance candidate in >= 90 % of 200 simulated searches, where
    2 x 4 manages at most 75 % on the same case."""
    torch.manual_seed(0)
    truth, picks = _simulated_search((), 200)
    best = int(truth.argmin())
    assert sorted(truth.tolist())[1] > 1.2 * float(truth[best])  # a real, not a wide, margin
    assert picks[best] >= 180, picks.tolist()
    _, old = _simulated_search(("diffusion.schedule_search.batches=2",
                                "diffusion.schedule_search.draws=4"), 200)
    assert old[best] <= 150, old.tolist()


def test_resample_clips_each_blocks_masked_fraction_with_the_conditioned_binomial_law():
    """`diffusion.resample` (bd3lms' `_resample_q_xt`): training's blocks all have a masked
    fraction in the range; a block drawn out of range gets Binomial(B, t) restricted to the
    allowed counts (what redrawing until it fits gives), at uniformly random positions; blocks
    in range, and validation, are left as drawn."""
    from cascade_mega.diffusion.block import BlockDiffusion
    from cascade_mega.diffusion.base import Shard
    from cascade_mega.diffusion.noise import Noise, resample
    from helpers import tiny_cfg

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n, B, t0 = 20000, 4, 0.7
    noise = Noise(torch.full((n, 1, B), t0, dtype=torch.float64),
                  torch.rand(n, 1, B, generator=g, dtype=torch.float64))
    got = resample(noise, B, 0.45, 0.95, g)
    before, after = (noise.u < noise.t)[:, 0], (got.u < got.t)[:, 0]
    k = after.sum(-1)
    assert bool(((k == 2) | (k == 3)).all()) and torch.equal(got.t, noise.t)
    kept = (before.sum(-1) == 2) | (before.sum(-1) == 3)
    assert torch.equal(got.u[kept], noise.u[kept])  # in range: untouched
    moved = ~kept
    p2 = 6 * t0**2 * (1 - t0)**2
    p3 = 4 * t0**3 * (1 - t0)
    share2 = float((k[moved] == 2).double().mean())
    sd = (p2 / (p2 + p3) * (1 - p2 / (p2 + p3)) / int(moved.sum())) ** 0.5
    assert abs(share2 - p2 / (p2 + p3)) < 4 * sd, (share2, p2 / (p2 + p3))
    per_position = after[moved].double().mean(0)  # uniformly placed
    assert float((per_position - per_position.mean()).abs().max()) < 0.02

    cfg = tiny_cfg("data.seq_len=64", "diffusion.block_size=4", "train.micro_batch_size=64",
                   "train.global_batch_size=64", "diffusion.t_min=0.45", "diffusion.t_max=0.95",
                   "diffusion.resample=true")
    objective_ = BlockDiffusion(cfg, None, Shard())
    train = objective_.draw(cfg, "train", 3)
    share = (train.u < train.t).double().view(64, 16, 4).mean(-1)
    assert bool(((share >= 0.45) & (share <= 0.95)).all())
    valid = objective_.draw(cfg, "valid", 3)
    assert bool(((valid.u < valid.t).double().view(64, 16, 4).mean(-1) == 0).any())


def test_bd3lms_criterion_is_the_variance_over_one_draws_per_block_losses(megatron, tmp_path):
    """`criterion: blocks` (bd3lms' `_clipped_schedule_search`): per candidate, one draw per
    validation batch, the variance over that batch's per-block losses (sum of 1/t-weighted CE
    over the block / B), summed over the batches; the search picks its argmin."""
    from cascade_mega.train.callbacks import schedule_search
    from cascade_mega.train.trainer import Trainer

    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "model.num_layers=1", "model.hidden_size=32",
        "model.num_attention_heads=2", "data.seq_len=32", "diffusion.block_size=4",
        "train.steps=4", "train.micro_batch_size=2", "train.global_batch_size=4",
        "optimizer.warmup_steps=1", "tracking.enabled=false", "train.eval_interval=0",
        "train.resume=none", "diffusion.schedule_search.interval=2",
        f"diffusion.schedule_search.candidates={CANDIDATES}",
        "diffusion.schedule_search.batches=3", "diffusion.schedule_search.criterion=blocks"])
    trainer = Trainer(cfg, []).setup()
    trainer.train_step(0)
    got = schedule_search.search(trainer, 2)
    model, mask_id = trainer.chunks[0], trainer.tokenizer.mask_id
    want = {}
    for lo, hi in CANDIDATES:
        total = 0.0
        for i in range(3):
            batch = trainer.valid_data.micro_batch(i * 4, 4)
            noise = objective.draw_noise(cfg, 4, noise_generator(
                cfg.train.seed, "schedule-search", 2, i, 0), objective.train_range(cfg, (lo, hi)))
            prep = objective.prepare(batch.tokens, batch.labels, batch.loss_mask, cfg, mask_id,
                                     noise, eod_id=trainer.tokenizer.eod)
            with torch.no_grad():
                ce, _ = score(model, prep)
            blocks = (ce.double() * prep.weight).view(4, 8, 4).sum(-1) / 4
            total += float(blocks.flatten().var())
        want[f"{lo:g}-{hi:g}"] = total
    for name, value in want.items():
        assert math.isclose(got[f"schedule_var/{name}"], value, rel_tol=1e-6), name
    lo, hi = (float(x) for x in min(want, key=want.get).split("-"))
    assert (got["schedule_t_min"], got["schedule_t_max"]) == (lo, hi)
    from cascade_mega.config import ConfigError

    with pytest.raises(ConfigError, match="criterion' = blocks reads each block's loss"):
        load_config(None, [f"run_dir={tmp_path}/bad", "diffusion.schedule_search.interval=2",
                           "parallel.pipeline=2", "model.num_layers=2",
                           "diffusion.schedule_search.criterion=blocks"], world_size=0)
