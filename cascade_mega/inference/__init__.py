"""Generation: `load_decoder(run_or_checkpoint).generate(prompts, ...)` (see decode.py)."""


def load_decoder(path: str, threads: int = 0):
    from cascade_mega.inference.load import load_decoder as load

    return load(path, threads)
