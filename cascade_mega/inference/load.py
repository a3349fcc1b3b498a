"""A decoder from a run directory or a checkpoint folder, on one process.

The run's `config.yaml` describes the model; the checkpoint (any parallel layout: it is resharded
on load) gives the weights; the dataset's tokenizer gives the vocabulary. A run directory read
while it trains may lose the checkpoint being loaded to `checkpoint.keep_last`: the newest one
that verifies is taken instead (a checkpoint folder named explicitly is not replaced).
"""

from __future__ import annotations

import os

import torch

from cascade_mega.checkpoint import locate


def load_model(path: str, threads: int = 0):
    """(config at one process, tokenizer, model with the checkpoint's weights) of a run or
    checkpoint."""
    from cascade_mega.config import ONE_PROCESS, load_config
    from cascade_mega.data import loader
    from cascade_mega.model.gpt import build_chunks
    from cascade_mega import checkpoint
    from cascade_mega.runtime import distributed

    config, ckpt = locate(path)
    cfg = load_config(config, ONE_PROCESS + ["model.recompute=none", "train.fp8=null"],
                      world_size=1)  # decoding runs without FP8
    if threads:
        torch.set_num_threads(threads)
    tokenizer = loader.run_tokenizer(cfg, os.path.dirname(config))
    distributed.init(cfg.parallel, cfg.train.seed)
    model, = build_chunks(cfg, tokenizer)
    for attempt in range(RETRIES + 1):
        try:
            checkpoint.load(ckpt, [model], None, None)
            return cfg, tokenizer, model
        except (checkpoint.CheckpointError, FileNotFoundError):
            if ckpt == path or os.path.isdir(ckpt) or attempt == RETRIES:
                raise  # not a vanished choice: the checkpoint itself is the problem
            ckpt = locate(path)[1]  # the trainer removed it (keep_last): the newest now


RETRIES = 3  # checkpoints of a training run that vanish while they are read


def load_decoder(path: str, threads: int = 0, precision: str = "", **full_diffusion):
    """The decoder for the checkpoint's objective: block / AR decoding, or for a full-diffusion
    checkpoint (B = L) `FullDiffusionDecoder` with `full_diffusion` options (cache, block,
    guidance). precision: the weights' and activations' dtype, like `train.precision` (auto:
    bf16 on GPU, fp32 on CPU); empty: the run's own setting."""
    from dataclasses import replace

    from cascade_mega.config import PRECISIONS, run_dtype
    from cascade_mega.inference.decode import GenerationError

    if precision and precision not in PRECISIONS:
        raise GenerationError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                              f"{precision!r}")
    cfg, tokenizer, model = load_model(path, threads)
    cfg = replace(cfg, train=replace(cfg.train, precision=precision or cfg.train.precision))
    model.to(run_dtype(cfg))  # the checkpoint's fp32 weights, rounded once
    return decoder_for(model, cfg, tokenizer, source=path, **full_diffusion)


def decoder_for(model, cfg, tokenizer, source: str = "the model", **full_diffusion):
    """The one decoder factory (`cascade generate`, the samples logged during training): block /
    AR decoding, or for full diffusion (B = L) `FullDiffusionDecoder` with its options."""
    from cascade_mega.inference import speculative  # noqa: F401  (registers its policies)
    from cascade_mega.inference.decode import Decoder, GenerationError
    from cascade_mega.inference.megatron import MegatronNetwork

    d, net = cfg.diffusion, MegatronNetwork(model, cfg, tokenizer)
    if net.full:
        from cascade_mega.inference.full_diffusion import FullDiffusionDecoder

        return FullDiffusionDecoder(net, **full_diffusion)
    if full_diffusion:
        options = ", ".join(f"--{'decode-block' if k == 'block' else k}" for k in full_diffusion)
        raise GenerationError(f"{options} applies to full-diffusion checkpoints (block_size = "
                              f"seq_len); {source} is a {d.objective} checkpoint with block size "
                              f"{net.block_size}")
    return Decoder(net)
