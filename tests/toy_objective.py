"""A toy objective written as a new objective is: this one module, nothing else edited.

A BERT-style masked LM: a fixed share of the tokens masked, weight 1, full attention over the one
stream. It registers itself as `toy_mlm` when imported (a run's `imports: [toy_objective]`, or a
test's import) and answers its own layout, which `cascade plan` and the FLOP count read
(`tests/test_objective.py`).
"""

from dataclasses import dataclass, fields

import torch

from cascade_mega.diffusion.base import Objective, SequenceLayout, noise_generator, register
from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.diffusion.objective import Prepared, ReadOut
from cascade_mega.model.gpt import predict_and_score


@dataclass
class MlmSums:
    loss: torch.Tensor
    masked: torch.Tensor
    correct: torch.Tensor

    def pack(self):
        return torch.stack([getattr(self, f.name).double() for f in fields(self)])

    @classmethod
    def unpack(cls, values):
        return cls(*values)


@register("toy_mlm")
class MaskedLM(Objective):
    Sums = MlmSums
    rate = 0.25

    @classmethod
    def layout(cls, cfg) -> SequenceLayout:
        L = cfg.data.seq_len  # one stream, every row read out, every pair attended
        return SequenceLayout("full", L, L, L * L, L)

    def prepare_micro_batch(self, batch, rows, cfg, split, step, noise):
        tokens = batch.tokens
        b, L = tokens.shape
        gen = noise_generator(cfg.train.seed, split, step, rows.start)
        masked = torch.rand(b, L, generator=gen) < self.rate
        ids = torch.where(masked, self.tokenizer.mask_id, tokens)
        return Prepared(ids, torch.arange(L)[None], AttentionLayout("full", L, L),
                        ReadOut(None, tokens), masked.double(), masked, int(masked.sum()),
                        count=masked.sum().int())

    def forward_step(self, data_iterator, model):
        prep = next(data_iterator)
        out = model(prep.input_ids, prep.position_ids, prep.layout,
                    output_processor=predict_and_score, output_processor_context=prep.readout)
        return out, lambda output: self.loss(prep, output)

    def loss_sums(self, prep, output):
        ce, correct = output[:2]
        loss = (ce * prep.weight.to(ce.dtype)).sum()
        return loss, MlmSums(loss.detach(), prep.count.double(), (correct & prep.scored).sum())

    def metrics(self, s, train):
        return {"loss": s.loss / max(s.masked, 1), "mlm_acc": s.correct / max(s.masked, 1)}
