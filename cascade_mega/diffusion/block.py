"""Block diffusion (B = 1 .. L, V views, the auxiliary AR stream, distillation) as the trainer's
`Objective` (`base.py`); the AR baseline (`ar.py`) is its subclass. The math lives in
`objective.py` as plain
functions (`prepare`, `reduce`), testable without a trainer; this class strings them together
for a step: the block size in force (`at_step`), one noise draw per global batch, the
distillation targets and the teacher's forward, and the metrics by name. Everything a forward needs
travels in its arguments: the noise levels as `noise_levels`, an MoE router's scale (loss tokens
per routed row) in the layout (`AttentionLayout.routing_scale`, `model/layers.py`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

from cascade_mega.config.objectives import layout_of
from cascade_mega.diffusion import distill, objective
from cascade_mega.diffusion.base import Objective, SequenceLayout, noise_generator, register
from cascade_mega.model.gpt import predict_and_score


@register("block_diffusion")
class BlockDiffusion(Objective):
    Sums = objective.LossSums
    clip = None  # the [t_min, t_max] a schedule search chose: `use_noise_range`
    accuracy = "masked_acc"  # the name of the accuracy metric (of the masked targets)

    def use_noise_range(self, t_range) -> None:
        """Training draws t in `t_range` from now on (the choice of a schedule search,
        `train/callbacks/schedule_search.py`; None: the config's range); validation keeps
        (t_floor, 1] (`objective.valid_range`)."""
        self.clip = None if t_range is None else tuple(t_range)

    def config_at(self, step: int):
        return objective.at_step(self.cfg, step)

    @classmethod
    def layout(cls, cfg) -> SequenceLayout:
        """V noisy views and, for B < L, the clean stream (full diffusion at B = L has none),
        plus the auxiliary causal stream unless the clean stream is causal itself (its rows then
        carry the next-token loss). Attention pairs (the mask's non-zeros): each view's rows see
        their block and the earlier clean blocks, V L (L + B) / 2; the block-causal clean rows
        theirs and the earlier ones, L (L + B) / 2; full diffusion V L^2; a causal stream (the
        auxiliary one, or the clean stream itself) L (L + 1) / 2."""
        d, L = cfg.diffusion, cfg.data.seq_len
        kind = "full" if d.block_size >= L else "block_diffusion"
        aux = d.ar_loss_weight > 0
        causal_clean = d.clean_stream == "causal" and kind == "block_diffusion"
        streams = d.views + int(kind == "block_diffusion") + int(aux and not causal_clean)
        causal_pairs = L * (L + 1) // 2
        if kind == "full":
            pairs = d.views * L * L + (causal_pairs if aux else 0)
        else:
            pairs = d.views * L * (L + d.block_size) // 2 + (causal_pairs if causal_clean else
                                                              L * (L + d.block_size) // 2) + \
                (causal_pairs if aux and not causal_clean else 0)
        return SequenceLayout(kind, streams * L, d.views * (L - int(d.shifted_prediction)) +
                              L * int(aux), pairs, d.block_size)

    def rows(self, cfg, train: bool) -> int:
        # the layout in force (an AR phase of a block-size schedule lays out AR's)
        return layout_of(cfg).rows + (distill.extra_rows(cfg) if train else 0)

    def validation_passes(self) -> tuple:
        """"common": the bound on `objective.common_targets` (what every objective predicts:
        sweeps compare objectives on it); "ce", for a score-entropy run: its bound with the
        cross-entropy alone (RADD's NELBO of softmax(logits), the model every decoding policy but
        `tweedie` samples from: a valid bound, tighter by E[g(Z / a) / t]), on the same noise."""
        return ("common",) + (("ce",) if self.cfg.diffusion.loss == "score_entropy" else ())

    def draw(self, cfg, split: str, step: int):
        if cfg.diffusion.objective == "ar":
            return None
        # one draw per global batch, whatever the layout; validation (and its further passes)
        # over the whole range above the floor, (t_floor, 1]; the "ce" pass on "valid"'s noise
        t_range = objective.train_range(cfg, self.clip) if split == "train" else \
            objective.valid_range(cfg)
        key = "valid" if split == "ce" else split
        d = cfg.diffusion
        clip = (self.clip or (d.t_min, d.t_max)) if d.resample and split == "train" else None
        return objective.draw_noise(cfg, cfg.train.global_batch_size,
                                    noise_generator(cfg.train.seed, key, step), t_range, clip)

    def prepare_micro_batch(self, batch, rows: slice, cfg, split: str, step: int, noise):
        prep = objective.prepare(batch.tokens, batch.labels, batch.loss_mask, cfg,
                                 self.tokenizer.mask_id,
                                 noise.rows(rows.start, rows.stop) if noise else None,
                                 context=self.shard.context, eod_id=self.tokenizer.eod,
                                 common=split == "common")
        if split == "ce":  # the cross-entropy alone (`validation_passes`)
            prep.readout = replace(prep.readout, score_entropy=False)
        if self.teacher is not None and split == "train":
            prep = distill.targets(prep, batch.tokens, cfg.distill.weight)
        return prep

    def forward_step(self, data_iterator, model):
        prep = next(data_iterator)
        # the layout carries the micro-batch's routing scale to the MoE layers (`model/layers.py`)
        if prep.distill_weight is not None:
            return distill.forward(model, self.teacher, prep), partial(self.loss, prep)
        out = model(prep.input_ids, prep.position_ids, prep.layout,
                    output_processor=predict_and_score, output_processor_context=prep.readout,
                    noise_levels=prep.noise_levels)
        return out, partial(self.loss, prep)

    def loss_sums(self, prep, output):
        return objective.reduce(*output[:2], prep, *output[2:])

    def metrics(self, s: objective.LossSums, train: bool) -> dict:
        d = self.cfg.diffusion
        loss = s.loss / s.tokens if s.tokens else float("nan")  # nan on stages without the loss
        out = {"loss": loss}
        # a clipped range bounds nothing; the floor (t > t_floor, 1e-3) leaves out a sliver
        # whose share of the bound is of the floor's order: training still reports it
        if not train or tuple(self.clip or (d.t_min, d.t_max)) == (0.0, 1.0):
            out["nelbo"] = loss
            out["ppl_bound"] = math.exp(min(loss, 50.0))
        out[self.accuracy] = s.correct / max(s.scored, 1)
        if s.ar_targets > 0:
            out["ar_loss"] = s.ar_loss / s.ar_targets
        if s.distill_targets > 0:
            out["distill_kl"] = s.distill_kl / s.distill_targets
        return out
