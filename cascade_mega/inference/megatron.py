"""A run's megatron-core model as the decoding core's `Network` (`inference/network.py`).

The decoders see only this: the model's facts (context, block size, prediction mode, whether its
logits are scores), one forward that returns the logits of the rows asked for, and the context a
generation runs in. The forward is the training model's own (`model/gpt.py`): megatron's layers
with the decoding step in the core-attention slot, the output layer run on the asked rows only.
"""

from __future__ import annotations

from contextlib import contextmanager

from cascade_mega.config.objectives import layout_of
from cascade_mega.model.gpt import allowed_logits, without_fp8
from cascade_mega.runtime.device import current


def logits_of_rows(*, hidden_states, output_layer, output_weight, context, **_unused):
    """megatron `output_processor`: `allowed_logits` [b, rows, V] of the rows in `context`."""
    return allowed_logits(hidden_states, output_layer, output_weight, context,
                          True).transpose(0, 1)


class MegatronNetwork:
    def __init__(self, model, cfg, tokenizer):
        d = cfg.diffusion
        self.model, self.cfg, self.tok = model, cfg, tokenizer
        self.max_len = cfg.data.seq_len
        layout = layout_of(cfg)  # the objective's answer
        self.causal, self.full = layout.causal, layout.kind == "full"
        self.block_size = layout.block
        self.shifted = bool(d.shifted_prediction) and not self.causal
        self.clean_stream = d.clean_stream
        self.ar_trained = d.ar_loss_weight > 0
        self.scores = d.loss == "score_entropy"
        self.time_conditioning = bool(cfg.model.time_conditioning)
        self.mask_id, self.eod = tokenizer.mask_id, tokenizer.eod
        self.flex = None
        if cfg.model.attention_kernel == "flex":
            from cascade_kernels import flex

            self.flex = flex

    @property
    def device(self):
        return current()  # the process's device, where the model was built

    def logits(self, ids, pos, step, rows, levels):
        return self.model(ids, pos, step, output_processor=logits_of_rows,
                          output_processor_context=rows, noise_levels=levels)

    @contextmanager
    def decoding(self):
        self.model.eval()
        with without_fp8(self.model):
            yield

    def detokenize(self, tokens):
        return self.tok.decode(tokens)
