"""Objectives: B = 1 shifted block diffusion is AR; the NELBO estimator's mean is exact."""

import math

import pytest
import torch

from cascade_mega.diffusion import objective
from helpers import MASK_ID, exact_block_nelbo, random_tokens, score, tiny_cfg, tiny_model


def test_shifted_block_size_one_equals_ar_loss(megatron):
    cfg_bd = tiny_cfg("diffusion.block_size=1", "diffusion.shifted_prediction=true")
    cfg_ar = tiny_cfg("diffusion.objective=ar")
    model = tiny_model(cfg_bd, seed=1)
    b, L = 3, 16
    x = random_tokens(b, L + 1, torch.Generator().manual_seed(2))
    tokens, labels = x[:, :L], x[:, 1:]
    ones = torch.ones(b, L)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prep_ar = objective.prepare(tokens, labels, ones, cfg_ar, MASK_ID, gen)
        ce_ar, _ = score(model, prep_ar)
        for t_range in [(1.0, 1.0), (0.0, 1.0)]:
            prep_bd = objective.prepare(tokens, labels, ones, cfg_bd, MASK_ID, gen,
                                        t_range=t_range)
            ce_bd, _ = score(model, prep_bd)
            # Same per-token values: token i from the clean stream's row i-1, i.e. AR's row i-1.
            torch.testing.assert_close(ce_bd, ce_ar[:, :L - 1], rtol=1e-5, atol=1e-6)
        # With every token masked (t = 1) the losses are equal as sums over the same targets.
        prep_bd = objective.prepare(tokens, labels, ones, cfg_bd, MASK_ID, gen, t_range=(1.0, 1.0))
        loss_bd, _ = objective.reduce(score(model, prep_bd)[0], score(model, prep_bd)[1], prep_bd)
        ar_mask = ones.clone()
        ar_mask[:, -1] = 0  # the AR target beyond x0 has no counterpart in x0
        prep_ar = objective.prepare(tokens, labels, ar_mask, cfg_ar, MASK_ID, gen)
        loss_ar, _ = objective.reduce(*score(model, prep_ar), prep_ar)
    assert prep_bd.num_tokens == prep_ar.num_tokens == b * (L - 1)
    torch.testing.assert_close(loss_bd, loss_ar, rtol=1e-5, atol=1e-5)


def exact_nelbo(model, cfg, x0):
    """E_t,mask[(1/t) sum_masked CE] / L by enumerating every mask pattern of every block
    (score entropy: of CE + g(Z / a))."""
    return exact_block_nelbo(model, cfg.diffusion.block_size, [], x0[0].tolist(),
                             cfg.diffusion.loss == "score_entropy") / x0.shape[1]


@pytest.mark.parametrize("loss", ["ce", "score_entropy"])
def test_nelbo_estimate_matches_exact_expectation(megatron, loss):
    """The training estimate over many noise draws against its exact value by enumeration, for
    the CE NELBO and the score-entropy one (which bounds the same likelihood, less tightly)."""
    cfg = tiny_cfg("data.seq_len=8", "diffusion.block_size=4", f"diffusion.loss={loss}")
    model = tiny_model(cfg, seed=9)
    L = 8
    x0 = random_tokens(1, L, torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = exact_nelbo(model, cfg, x0)
        if loss == "score_entropy":  # >= the CE bound of the same logits, normalised
            assert exact > exact_nelbo(model, tiny_cfg("data.seq_len=8",
                                                       "diffusion.block_size=4"), x0)
        copies = 2048
        prep = objective.prepare(x0.expand(copies, L), x0.expand(copies, L),
                                 torch.ones(copies, L), cfg, MASK_ID,
                                 torch.Generator().manual_seed(123))
        ce, _ = score(model, prep)
    per_copy = (ce.double() * prep.weight).sum(1) / L
    mean, se = float(per_copy.mean()), float(per_copy.std() / math.sqrt(copies))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert se < 0.05 * exact  # the check has teeth: a 10% bias would fail


def test_common_target_bound_matches_exact_conditional_nelbo(megatron):
    """The validation pass on the targets every objective shares (`objective.common_targets`:
    not token 0, not a document's first token), those tokens given: its estimate over many
    draws against -log p(targets | the others)'s NELBO by enumeration, per target; AR scores
    the same tokens."""
    cfg = tiny_cfg("data.seq_len=8", "diffusion.block_size=4")
    model = tiny_model(cfg, seed=9)
    L, copies = 8, 2048
    x0 = random_tokens(1, L, torch.Generator().manual_seed(4))
    eod = 7
    x0[x0 == eod] = eod + 1
    x0[0, [2, 5]] = eod  # positions 3 and 6 open documents
    keep = objective.common_targets(x0, eod)[0]
    assert keep.tolist() == [False, True, True, False, True, True, False, True]
    given = [i for i in range(L) if not keep[i]]
    with torch.no_grad():
        exact = exact_block_nelbo(model, 4, [], x0[0].tolist(), given=given) / int(keep.sum())
        prep = objective.prepare(x0.expand(copies, L), x0.expand(copies, L),
                                 torch.ones(copies, L), cfg, MASK_ID,
                                 torch.Generator().manual_seed(123), eod_id=eod, common=True)
        ce, _ = score(model, prep)
    assert prep.num_tokens == copies * int(keep.sum())
    assert not bool(prep.scored[:, ~keep].any())  # the given tokens are never masked
    per_copy = (ce.double() * prep.weight).sum(1) / int(keep.sum())
    mean, se = float(per_copy.mean()), float(per_copy.std() / math.sqrt(copies))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert se < 0.05 * exact
    ar = objective.prepare(x0, torch.roll(x0, -1, 1), torch.ones(1, L),
                           tiny_cfg("data.seq_len=8", "diffusion.objective=ar"), MASK_ID, None,
                           eod_id=eod, common=True)
    assert (ar.weight[0] > 0).tolist() == keep[1:].tolist() + [False]  # label j: token j + 1


def test_a_new_objective_is_one_module_that_trains_plans_and_counts_its_flops(megatron, tmp_path):
    """The toy masked LM of `toy_objective.py` (one module: a registered `Objective` subclass and
    its layout; nothing of the project edited) named by a run with `imports`: the real trainer
    trains it and reports its own metrics, `cascade plan` plans its layout (one stream of L rows,
    not block diffusion's 2L) and the FLOP count runs over its rows and attention pairs."""
    import json

    from cascade_mega import config
    from cascade_mega.config.objectives import REGISTRY
    from cascade_mega.diffusion import flops
    from cascade_mega.model.dims import model_dims
    from cascade_mega.train.callbacks import MetricsFile
    from cascade_mega.train.trainer import Trainer
    from helpers import cascade

    L, mine = 32, ["diffusion.objective=toy_mlm", "imports=[toy_objective]"]
    cfg = config.load_config(None, [
        f"run_dir={tmp_path}", *mine, "model.num_layers=2", "model.hidden_size=64",
        f"data.seq_len={L}", f"diffusion.block_size={L}", "train.steps=12",
        "train.micro_batch_size=4", "train.global_batch_size=8", "optimizer.warmup_steps=1",
        "optimizer.lr=3e-3", "train.log_interval=1", "train.eval_interval=12",
        "train.eval_batches=1", "tracking.enabled=false"], world_size=1)
    trainer = Trainer(cfg, [MetricsFile(cfg.run_dir)]).setup()
    assert isinstance(trainer.objective, REGISTRY["toy_mlm"])
    trainer.fit()
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in lines if r["split"] == "train" and "mlm_acc" in r]
    assert len(steps) == 12 and "nelbo" not in steps[0]
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)  # it learns: the unigram statistics at least
    assert any("mlm_acc" in r and r["split"] == "valid" for r in lines)

    plans = {}
    for name, extra in (("toy", mine), ("bd", [])):
        proc = cascade("plan", "configs/base.yaml", "model.vocab_size=512", f"data.seq_len={L}",
                       "diffusion.block_size=8", *extra, "--gpus", "1", "--json")
        assert proc.returncode == 0, proc.stderr
        plans[name] = json.loads(proc.stdout.splitlines()[-1])
    assert (plans["toy"]["sequence"], plans["toy"]["rows"], plans["toy"]["readout"]) == \
        ("full", L, L)
    assert (plans["bd"]["sequence"], plans["bd"]["rows"]) == ("block_diffusion", 2 * L)
    assert plans["toy"]["stages"][0]["activation_bytes"] < \
        plans["bd"]["stages"][0]["activation_bytes"]

    x, V = model_dims(cfg, 512), 512
    h, a, g, d, f = x["h"], x["a"], x["g"], x["d"], x["f"]
    per_layer = 2 * L * h * (a + 2 * g) * d + 2 * L * a * d * h + 6 * L * h * f
    assert flops.forward_flops(cfg, V) == (2 * per_layer + 2 * L * h * x["V"],
                                           2 * 4 * a * d * L * L)
    with pytest.raises(config.ConfigError, match="'imports' names module 'nowhere_objective'"):
        config.load_config(None, [f"run_dir={tmp_path}", "imports=[nowhere_objective]"])
    with pytest.raises(config.ConfigError, match="not a registered objective; registered: ar, "):
        config.load_config(None, [f"run_dir={tmp_path}", "diffusion.objective=bert"])


def test_padded_samples_score_every_real_token_and_no_padding():
    """megatron pads a short sample at its end, its loss mask over the labels (0 where the label
    is padding). A diffusion target is the token itself: the last real token is scored, padding
    is not; the AR objective scores labels, megatron's mask as it is."""
    L, pad, real = 16, 5, 12
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(6, MASK_ID, (2, L), generator=g)
    tokens[:, real:] = pad
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), pad)], 1)
    loss_mask = (labels != pad).float()  # label i is token i + 1: 11 real labels
    for extra, scored in ((["diffusion.shifted_prediction=false"], real),
                          (["diffusion.shifted_prediction=true"], real - 1),  # no token before 0
                          (["diffusion.objective=ar"], real - 1)):
        cfg = tiny_cfg(f"data.seq_len={L}", "diffusion.block_size=4", *extra)
        prep = objective.prepare(tokens, labels, loss_mask, cfg, MASK_ID, g)
        assert prep.num_tokens == 2 * scored, extra
        targets = prep.readout.labels[prep.weight > 0]
        assert pad not in targets.tolist(), extra
    # every real token can be a masked target: over many noise draws each one is
    cfg = tiny_cfg(f"data.seq_len={L}", "diffusion.block_size=4")
    hit = torch.zeros(L, dtype=torch.bool)
    for _ in range(50):
        prep = objective.prepare(tokens, labels, loss_mask, cfg, MASK_ID, g)
        hit |= (prep.weight > 0).reshape(2, -1, L).any(0).any(0)
    assert hit[:real].all() and not hit[real:].any()


def test_training_and_validation_draw_t_above_the_floor():
    """The trainer's noise (`BlockDiffusion.draw`): training t in (t_floor, 1], complementary
    views' 1 - t above the floor too; validation over (t_floor, 1], so its 1/t weights are
    bounded, and it reaches both ends."""
    from cascade_mega.diffusion.block import BlockDiffusion
    from cascade_mega.diffusion.base import Shard

    for extra in ([], ["diffusion.views=2", "diffusion.complementary=true"]):
        cfg = tiny_cfg("data.seq_len=64", "train.micro_batch_size=64",
                       "train.global_batch_size=64", "diffusion.t_floor=0.05", *extra)
        objective_ = BlockDiffusion(cfg, None, Shard())
        train = objective_.draw(cfg, "train", 3).t
        assert float(train.min()) > 0.05 and float(train.max()) <= 1.0
        if extra:
            assert float(train.max()) < 0.95  # its complement stays above the floor
            assert torch.equal(train[:, 1], 1 - train[:, 0])
        for split in ("valid", "common"):
            valid = objective_.draw(cfg, split, 3).t  # both views' levels above the floor
            assert 0.05 < float(valid.min()) < 0.06 and float(valid.max()) > 0.94 + 0.05 * (
                not extra)
