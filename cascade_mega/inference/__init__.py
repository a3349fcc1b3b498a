"""Generation: `load_decoder(run_or_checkpoint).generate(prompts, ...)` (see decode.py)."""

from cascade_mega.inference.load import load_decoder  # noqa: F401
