"""Score entropy (`model/scores.py`) against SEDD's loss as written, in float64: RADD's identity
(scores a x softmax: the DSE is the 1/t-weighted cross-entropy), the bound it gives otherwise,
and the stable form the model computes. (Its estimate against exact enumeration on a tiny model:
tests/test_objective.py; vocabulary-parallel at TP = 2: tests/test_torchrun.py.)"""

import math

import torch

from cascade_mega.model import scores


def _draws(n=4000, V=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=gen, dtype=torch.float64) * 3
    x0 = torch.randint(0, V, (n,), generator=gen)
    t = 10 ** -(3 * torch.rand(n, generator=gen, dtype=torch.float64))  # 1e-3 .. 1
    t = t.clamp(max=1 - 1e-6)
    return logits, x0, t


def _ce(logits, x0):
    return torch.logsumexp(logits, 1) - logits.gather(1, x0[:, None])[:, 0]


def test_radd_identity_normalised_scores_give_the_weighted_cross_entropy():
    logits, x0, t = _draws()
    a = (1 - t) / t
    dse = scores.dse_three_terms(a[:, None] * logits.softmax(1), x0, t)
    ce = _ce(logits, x0) / t
    assert torch.allclose(dse, ce, rtol=1e-10, atol=1e-10), float((dse - ce).abs().max())


def test_unnormalised_scores_bound_the_normalised_cross_entropy_from_above():
    logits, x0, t = _draws(seed=1)
    gen = torch.Generator().manual_seed(2)
    scale = torch.exp(torch.randn(len(t), 1, generator=gen, dtype=torch.float64) * 2)
    a = (1 - t) / t
    dse = scores.dse_three_terms(scale * a[:, None] * logits.softmax(1), x0, t)
    ce = _ce(logits, x0) / t
    assert bool((dse >= ce - 1e-9 * ce.abs()).all())
    assert float((dse - ce).min()) >= -1e-9 and float((dse - ce).max()) > 1.0  # not all equal


def test_the_models_parameterisation_in_the_stable_form_equals_the_three_terms():
    """log s_y = logit_y + log a - log(V - 1): (1/t)[CE + g(Z / a)] with the module's `excess`
    equals SEDD's three-term DSE, and needs no time input (g depends on the logits only)."""
    logits, x0, t = _draws(seed=3)
    V = logits.shape[1]
    a = (1 - t) / t
    s = torch.exp(logits + a.log()[:, None] - math.log(V - 1))
    reference = scores.dse_three_terms(s, x0, t)
    lse = scores.vocab_parallel_logsumexp(logits)  # one process: the plain log-sum-exp
    assert torch.allclose(lse, torch.logsumexp(logits, 1), rtol=0, atol=1e-12)
    stable = (_ce(logits, x0) + scores.excess(lse, math.log(V - 1))) / t
    assert torch.allclose(stable, reference, rtol=1e-10, atol=1e-10), \
        float(((stable - reference) / reference).abs().max())
    # at Z / a = 1 (logits normalised to log(V - 1)) the excess vanishes
    normal = logits - torch.logsumexp(logits, 1, keepdim=True) + math.log(V - 1)
    assert float(scores.excess(torch.logsumexp(normal, 1), math.log(V - 1)).abs().max()) < 1e-12


def test_a_score_entropy_run_validates_its_cross_entropy_bound_beside_its_own(megatron, tmp_path):
    """Validation logs `nelbo_ce` (RADD's bound of softmax(logits), what every policy but
    tweedie samples from) beside the score-entropy `nelbo`, on the same noise: each equals its
    sum computed here through the model, and the CE bound is the tighter (g >= 0)."""
    from dataclasses import replace

    from cascade_mega.config import load_config
    from cascade_mega.diffusion import objective
    from cascade_mega.diffusion.base import noise_generator
    from cascade_mega.train.trainer import Trainer
    from helpers import score

    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "model.num_layers=1", "model.hidden_size=32",
        "model.num_attention_heads=2", "data.seq_len=16", "diffusion.block_size=4",
        "train.steps=2", "optimizer.warmup_steps=1", "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "tracking.enabled=false", "train.eval_interval=0", "train.eval_batches=2",
        "train.resume=none", "diffusion.loss=score_entropy", "model.init_std=0.2"])
    trainer = Trainer(cfg, []).setup()
    got = trainer.evaluate(0)
    model, mask_id = trainer.chunks[0], trainer.tokenizer.mask_id
    want = {"se": 0.0, "ce": 0.0}
    tokens = 0
    for i in range(2):
        batch = trainer.valid_data.micro_batch(i * 4, 4)
        noise = objective.draw_noise(cfg, 4, noise_generator(cfg.train.seed, "valid", i),
                                     objective.valid_range(cfg))
        prep = objective.prepare(batch.tokens, batch.labels, batch.loss_mask, cfg, mask_id,
                                 noise, eod_id=trainer.tokenizer.eod)
        assert prep.readout.score_entropy
        with torch.no_grad():
            for name, readout in (("se", prep.readout),
                                  ("ce", replace(prep.readout, score_entropy=False))):
                ce, _ = score(model, replace(prep, readout=readout))
                want[name] += float((ce.double() * prep.weight).sum())
        tokens += prep.num_tokens
    assert math.isclose(got["nelbo"], want["se"] / tokens, rel_tol=1e-5)
    assert math.isclose(got["nelbo_ce"], want["ce"] / tokens, rel_tol=1e-5)
    assert got["nelbo_ce"] < got["nelbo"] and got["ppl_bound_ce"] < got["ppl_bound"]
