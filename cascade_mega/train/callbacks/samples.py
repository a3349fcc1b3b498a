"""A few generations of the current model at each evaluation, as tracking artifacts
(`samples/step_NNNNNNN.txt`), through the decoder `cascade generate` uses for the run's
objective (`inference/load.py: decoder_for`): block / AR decoding, or full diffusion.

Prompts are the starts of validation sequences, so successive evaluations are comparable. Runs
on one-stage layouts only (the decoders hold the whole model); a decoder that refuses the model
warns once and stops trying, training goes on.
"""

from __future__ import annotations

from cascade_mega.train.callbacks.base import Callback

PROMPT_TOKENS = 8


class SampleGenerations(Callback):
    def __init__(self, cfg, sink):
        """sink: where the text goes (`MlflowTracker.artifact(name, bytes)`)."""
        self.cfg, self.sink, self.ok = cfg, sink, True

    def on_eval_end(self, trainer, step, metrics):
        text = self.generate(trainer)
        if text is not None:
            self.sink.artifact(f"samples/step_{step:07d}.txt", text.encode())

    def generate(self, trainer):
        from cascade_mega.inference.decode import GenerationError
        from cascade_mega.inference.load import decoder_for
        from cascade_mega.tracking import store

        n, p = self.cfg.tracking.samples, self.cfg.parallel
        if not n or not self.ok or p.tensor * p.pipeline * p.context > 1:
            return None
        try:
            model = getattr(trainer.chunks[0], "module", trainer.chunks[0])
            decoder = decoder_for(model, self.cfg, trainer.tokenizer)
            batch = trainer.valid_data.micro_batch(0, n)
            prompts = [row[:PROMPT_TOKENS].tolist() for row in batch.tokens]
            outs = decoder.generate(prompts, self.cfg.tracking.sample_tokens)
        except GenerationError as err:
            self.ok = False
            store.warn(f"no sample generations in the tracking run: {err}")
            return None
        finally:
            trainer.chunks[0].train()
        return "\n\n".join(f"### prompt: {trainer.tokenizer.decode(p)!r}\n{o.text}"
                           for p, o in zip(prompts, outs))
