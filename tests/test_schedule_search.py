"""The data-driven clipped schedule (`diffusion.schedule_search`,
train/callbacks/schedule_search.py) in a real Trainer: its variances against the same held-out
batches and draws scored here, one forward each; the range it picks is the argmin, training then
draws inside it, and a resume reads back the choice made before its step."""

import json
import math
from types import SimpleNamespace

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
