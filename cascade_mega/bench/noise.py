"""`cascade bench noise RUN`: the variance of the training loss estimate under each t floor.

The estimator a diffusion run trains on is a Monte-Carlo draw of its NELBO: the noise levels t of
the blocks, the masks, the 1/t weights. Near t = 0 a masked token's weight 1/t has no bound (its
second moment diverges), so a rare draw dominates a step. This benchmark holds one batch of
validation sequences and the run's weights fixed and redraws only the noise, `--draws` times per
floor (`diffusion.t_floor`, the run's own sampler and clip): per floor, the standard deviation
of the batch's loss estimate, its mean (the floor's bias against the unfloored estimate is the
difference of the means), the largest weight drawn and the share of draws holding a weight above
1000. ratio = the standard deviation at each floor over the one without a floor.

`--tokens-per-step N` adds the same rows at a step of N tokens, where the weights alone decide
(every token's cross-entropy 1, the run's block size and sampler, `--draws` steps): what a small
batch on this machine cannot show, the rare weight near t = 0 that large steps draw every time.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace


def add_arguments(p) -> None:
    p.add_argument("run", help="a block-diffusion run directory or checkpoint")
    p.add_argument("--floors", default="0,1e-4,1e-3,1e-2", help="t floors, comma-separated")
    p.add_argument("--draws", type=int, default=64, help="noise draws per floor")
    p.add_argument("--batch", type=int, default=16, help="validation sequences held fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens-per-step", type=int, help="also simulate the weights at this step size")
    p.add_argument("--clip", help="T_MIN,T_MAX: draw from this clipped range instead of the "
                   "run's (a schedule search's candidate; the search keeps the lowest std)")
    p.add_argument("--json", action="store_true", help="end with one JSON line")


def _estimates(model, cfg, batch, mask_id, floor: float, draws: int, seed: int):
    import torch

    from cascade_mega.diffusion import objective
    from cascade_mega.diffusion.base import noise_generator
    from cascade_mega.model.gpt import predict_and_score
    from cascade_mega.runtime.device import to_device

    cfg = replace(cfg, diffusion=replace(cfg.diffusion, t_floor=floor))
    out = []
    for k in range(draws):
        gen = noise_generator(seed, "bench-noise", k)  # the same draws' uniforms at every floor
        noise = objective.draw_noise(cfg, batch.tokens.shape[0], gen, objective.train_range(cfg))
        prep = objective.prepare(batch.tokens, batch.labels, batch.loss_mask, cfg, mask_id, noise)
        dev = to_device(prep)
        with torch.no_grad():
            ce, _ = model(dev.input_ids, dev.position_ids, dev.layout,
                          output_processor=predict_and_score, output_processor_context=dev.readout,
                          noise_levels=dev.noise_levels)
        loss = float((ce.double().cpu() * prep.weight).sum()) / prep.num_tokens
        out.append((loss, float(prep.weight.max())))
    return out


def _weights_only(cfg, tokens: int, floor: float, draws: int, seed: int):
    """(estimate, largest weight) per simulated step of `tokens` tokens, cross-entropy 1."""
    import torch

    from cascade_mega.diffusion import noise as noise_lib
    from cascade_mega.diffusion.base import noise_generator

    d = cfg.diffusion
    B = d.block_size
    low, high = max(d.t_min, floor), d.t_max
    out = []
    for k in range(draws):
        gen = noise_generator(seed, "bench-noise-weights", k)
        # host tensors on purpose: a simulation of the weights alone, no model is involved
        t = noise_lib.sample_t(tokens // B, gen, d.noise_sampling == "stratified", low, high)
        masked = torch.rand(tokens // B, B, generator=gen, dtype=torch.float64) < t[:, None]
        w = masked / t[:, None]
        out.append((float(w.sum()) / tokens, float(w.max())))
    return out


def _row(draws, base):
    import statistics

    losses = [d[0] for d in draws]
    sd = statistics.stdev(losses)
    return {"mean": statistics.fmean(losses), "std": sd, "ratio": sd / (base or sd),
            "max_weight": max(d[1] for d in draws),
            "over_1000": sum(d[1] > 1000 for d in draws) / len(draws)}


def _print(rows, what):
    print(what)
    print(f"{'t_floor':>8} {'mean':>9} {'std':>9} {'ratio':>6} {'max 1/t':>10} {'>1000':>6}")
    for floor, r in rows.items():
        print(f"{floor:>8g} {r['mean']:>9.4f} {r['std']:>9.5f} {r['ratio']:>6.3f} "
              f"{r['max_weight']:>10.4g} {r['over_1000']:>6.1%}")


def run(args) -> dict:
    from cascade_mega.config import ConfigError
    from cascade_mega.data import loader
    from cascade_mega.inference.load import load_model

    if args.draws < 2:
        raise ConfigError(f"--draws must be >= 2 (a spread needs two), got {args.draws}")
    try:
        floors = [float(f) for f in args.floors.split(",") if f.strip()]
    except ValueError:
        floors = []
    if not floors or any(not 0 <= f < 1 for f in floors):
        raise ConfigError(f"--floors {args.floors!r}: give floors in [0, 1), comma-separated")
    clip = None
    if args.clip is not None:
        try:
            clip = tuple(float(x) for x in args.clip.split(","))
        except ValueError:
            clip = ()
        if len(clip) != 2 or not 0 <= clip[0] < clip[1] <= 1 or clip[1] <= max(floors):
            raise ConfigError(f"--clip {args.clip!r}: give T_MIN,T_MAX with 0 <= T_MIN < "
                              "T_MAX <= 1, T_MAX above every floor")
    cfg, tokenizer, model = load_model(args.run)
    if cfg.diffusion.objective != "block_diffusion":
        raise ConfigError(f"{args.run} is an AR run: its loss draws no noise")
    if clip is not None:
        if cfg.diffusion.complementary and abs(sum(clip) - 1) > 1e-12:
            raise ConfigError(f"--clip {args.clip!r}: {args.run} has complementary views, "
                              "which need a symmetric range (T_MIN = 1 - T_MAX)")
        cfg = replace(cfg, diffusion=replace(cfg.diffusion, t_min=clip[0], t_max=clip[1]))
    model.eval()
    cfg = replace(cfg, train=replace(cfg.train, eval_batches=1,
                                     global_batch_size=max(args.batch, 1)))
    _, valid = loader.build_splits(cfg, tokenizer, loader.resolve_path(cfg.data.path), 1)
    batch = valid.micro_batch(0, args.batch)
    order = [0.0] + [f for f in floors if f != 0.0]
    rows = {}
    for floor in order:
        rows[floor] = _row(_estimates(model, cfg, batch, tokenizer.mask_id, floor, args.draws,
                                      args.seed), rows[0.0]["std"] if rows else None)
    d = cfg.diffusion
    _print(rows, f"{args.draws} draws of the noise on {args.batch} validation sequences of "
           f"{cfg.data.seq_len} tokens (B = {d.block_size}, t in [{d.t_min:g}, {d.t_max:g}]), "
           "the run's weights; ratio: std over the unfloored one")
    result = {"floors": {str(f): r for f, r in rows.items()},
              "std_ratio": {str(f): r["ratio"] for f, r in rows.items()},
              "bias": {str(f): r["mean"] - rows[0.0]["mean"] for f, r in rows.items()},
              "ppl_bound_unfloored": math.exp(min(rows[0.0]["mean"], 50))}
    if args.tokens_per_step:
        sim = {}
        for floor in order:
            sim[floor] = _row(_weights_only(cfg, args.tokens_per_step, floor, args.draws,
                                            args.seed), sim[0.0]["std"] if sim else None)
        _print(sim, f"{args.draws} simulated steps of {args.tokens_per_step} tokens, every "
               "cross-entropy 1 (the weights alone)")
        result["weights_only"] = {str(f): r for f, r in sim.items()}
    if args.json:
        print(json.dumps(result))
    return result
