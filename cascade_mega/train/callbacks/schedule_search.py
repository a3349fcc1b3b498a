"""BD3-LM's data-driven clipped schedule (`diffusion.schedule_search`): every `interval` steps,
the [t_min, t_max] among `candidates` whose loss estimate varies least becomes the range training
draws its noise from.

Design choices:
- The criterion is BD3-LM's: the variance of the loss estimator stands in for the variance of
  the gradient it drives (lower is better; a clipped range trades the bound's exactness for it,
  which is why the validation NELBO stays over the whole range, (t_floor, 1]).
- Held-out data: the first `batches` validation batches, the same at every search; for each, the
  variance over `draws` noise draws (from (seed, step, batch, draw): a resumed run searches the
  same way), averaged over the batches, so the data's own spread is left out; the candidates
  are compared on the same draws (common random numbers). bd3lms' procedure is `criterion:
  blocks` (`block_variances`): the variance over the per-block losses of one draw per
  validation batch (each block its own t: data and noise spread together), summed over the
  batches.
- Power: with few draws the variance estimates are noisy (about sqrt(2 / (batches (draws - 1)))
  relative error), and the search picks a worse range by chance. The defaults, 8 batches x 8
  draws (64 forwards per candidate), pick the lowest-variance range in >= 90 % of searches in
  the simulation of `tests/test_schedule_search.py`, where 2 x 4 picks it in about 60 %
  (measured figures: docs/training.md, "Noise, clipped ranges and the schedule search").
- `diffusion.resample` (bd3lms' `training.resample`): training also clips the realised masked
  fraction of each block into the range, not only t (`noise.resample`); the search then measures
  each candidate with it.
- At the block size in force (a block-size schedule changes it; BD3-LM searches per block size).
- Every rank takes part (the forwards are collective); the last pipeline stage holds the losses,
  and one sum over the pipeline group gives every rank the same variances and the same choice.
- The choice is logged with the step's metrics (`schedule_t_min`, `schedule_t_max`,
  `schedule_var/<t_min>-<t_max>`: what `pre_step` returns, which also has that step logged) and
  kept in `<run_dir>/schedule_search.jsonl` (step, chosen range, variances), which a resume reads
  back (`on_resume`: lines after the resumed step dropped).
- A component of the trainer (`ScheduleSearch`, installed on every rank: `callbacks/base.py`),
  before the step's profiling window opens (the search is not part of the step).
"""

from __future__ import annotations

import json
import os

import torch
from megatron.core import parallel_state

from cascade_mega.diffusion import objective
from cascade_mega.diffusion.base import noise_generator
from cascade_mega.runtime import device
from cascade_mega.train.callbacks.base import Callback

FILE = "schedule_search.jsonl"


class ScheduleSearch(Callback):
    every_rank = True  # the search's forwards are collective

    def on_resume(self, trainer):
        restore(trainer)  # the range the last search before the resumed step chose

    def pre_step(self, trainer, step):
        return search(trainer, step) if due(trainer.cfg, step) else None


def due(cfg, step: int) -> bool:
    """Whether a search runs before training step `step` (never before the first)."""
    interval = cfg.diffusion.schedule_search.interval
    return bool(interval) and step > 0 and step % interval == 0


def variances(cfg, step: int, loss_sums) -> torch.Tensor:
    """[candidates] the criterion: per candidate, the variance over `draws` noise draws of the
    per-token loss of each of `batches` batches, averaged over the batches. `loss_sums(i, noise)`
    -> (loss sum, tokens) of batch i under `noise` (the trainer's forward, or a simulation's).
    The draws do not depend on the candidate (common random numbers: candidate c maps the same
    uniforms into its range), so the candidates are compared on the same randomness."""
    ss, gbs = cfg.diffusion.schedule_search, cfg.train.global_batch_size
    out = []
    for lo, hi in ss.candidates:
        t_range = objective.train_range(cfg, (lo, hi))
        sums = []
        for i in range(ss.batches):
            for k in range(ss.draws):
                noise = objective.draw_noise(cfg, gbs, noise_generator(
                    cfg.train.seed, "schedule-search", step, i, k), t_range,
                    resample=(lo, hi) if cfg.diffusion.resample else None)
                sums.append(torch.as_tensor(loss_sums(i, noise)[:2]))
        s = torch.stack(sums).double()  # [batches x draws, (loss, tokens)]
        loss = (s[:, 0] / s[:, 1].clamp(min=1)).view(ss.batches, ss.draws)
        out.append(loss.var(dim=1, unbiased=ss.draws > 1).mean())
    return torch.stack(out)


def block_losses(prep, ce: torch.Tensor, block: int) -> torch.Tensor:
    """[b, V x blocks] each block's weighted loss per position, sum (1/t) CE / B over its
    targets (bd3lms' `nlls.reshape(b, -1, block_size).mean(-1)`), from per-target CE [b, n]."""
    n = ce.shape[1] - prep.aux_cols
    loss = (ce[:, :n].double() * prep.weight[:, :n].to(ce.device, torch.float64))
    pos = prep.target_pos.to(ce.device)
    per_view = pos.numel() // prep.layout.views
    blocks = prep.layout.seq_len // block
    index = (torch.arange(pos.numel(), device=ce.device) // per_view) * blocks + pos // block
    out = torch.zeros(ce.shape[0], prep.layout.views * blocks, dtype=torch.float64,
                      device=ce.device)
    return out.index_add_(1, index, loss) / block


def block_variances(trainer, cfg, step: int) -> torch.Tensor:
    """bd3lms' criterion (`criterion: blocks`): per candidate, one draw per validation batch,
    the variance over the batch's per-block losses (every sequence, view and data-parallel
    rank's blocks), summed over the batches. One pipeline stage and no context parallel (config
    check: the per-block losses are read off the model's output on one rank)."""
    from cascade_mega.model.gpt import predict_and_score

    ss, model = cfg.diffusion.schedule_search, trainer.chunks[0]
    block = min(cfg.diffusion.block_size, cfg.data.seq_len)
    dp = parallel_state.get_data_parallel_group()
    out = []
    for lo, hi in ss.candidates:
        total = torch.zeros((), dtype=torch.float64, device=device.current())
        for i in range(ss.batches):
            noise = objective.draw_noise(cfg, cfg.train.global_batch_size, noise_generator(
                cfg.train.seed, "schedule-search", step, i, 0), objective.train_range(cfg, (lo, hi)),
                resample=(lo, hi) if cfg.diffusion.resample else None)
            batch = trainer.objective.batch(trainer.valid_data, i, "valid", draw=noise, cfg=cfg)
            losses = []
            for prep in batch.make():
                ce = model(prep.input_ids, prep.position_ids, prep.layout,
                           output_processor=predict_and_score,
                           output_processor_context=prep.readout,
                           noise_levels=prep.noise_levels)[0]
                losses.append(block_losses(prep, ce, block).flatten())
            x = torch.cat(losses)
            moments = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])
            if trainer.dp_size > 1:
                torch.distributed.all_reduce(moments, group=dp)
            count, s1, s2 = moments
            total += (s2 - s1 * s1 / count) / (count - 1).clamp(min=1)
        out.append(total)
    return torch.stack(out)


@torch.no_grad()
def search(trainer, step: int) -> dict:
    """Measure every candidate, switch the trainer's objective to the best; its metrics."""
    cfg = trainer.objective.config_at(step)
    for c in trainer.chunks:
        c.eval()

    def loss_sums(i, noise):
        batch = trainer.objective.batch(trainer.valid_data, i, "valid", draw=noise, cfg=cfg)
        return trainer.run_schedule(batch, forward_only=True)[:2]

    if cfg.diffusion.schedule_search.criterion == "blocks":
        var = block_variances(trainer, cfg, step)
    else:
        var = variances(cfg, step, loss_sums)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        var = torch.zeros_like(var)  # the losses live on the last stage
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(var, group=parallel_state.get_pipeline_model_parallel_group())
    values = var.cpu().tolist()  # one read-back per search
    candidates = cfg.diffusion.schedule_search.candidates
    best = min(range(len(values)), key=values.__getitem__)
    chosen = [float(x) for x in candidates[best]]
    trainer.objective.use_noise_range(chosen)
    record = {"step": step, "chosen": chosen,
              "variances": {_name(c): v for c, v in zip(candidates, values)}}
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(trainer.run_dir, FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
    metrics = {"schedule_t_min": chosen[0], "schedule_t_max": chosen[1]}
    metrics.update({f"schedule_var/{k}": v for k, v in record["variances"].items()})
    return metrics


def restore(trainer) -> None:
    """The range the last search before the resumed step chose (lines after it dropped)."""
    path = os.path.join(trainer.run_dir, FILE)
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if record.get("step", 0) <= trainer.start_step:
                keep.append(record)
    if keep:
        trainer.objective.use_noise_range(keep[-1]["chosen"])
    if torch.distributed.get_rank() == 0:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(path + ".tmp", path)


def _name(c) -> str:
    return f"{c[0]:g}-{c[1]:g}"
