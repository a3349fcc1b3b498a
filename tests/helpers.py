"""Small builders shared by tests."""

from __future__ import annotations

import torch

from cascade_mega.config import load_config
from cascade_mega.model.gpt import build_model, predict_and_score

VOCAB = 40
MASK_ID = VOCAB - 1


def tiny_cfg(*overrides, run_dir="/tmp/cascade-test"):
    base = [f"run_dir={run_dir}", "model.num_layers=2", "model.hidden_size=64",
            "model.num_attention_heads=4", "data.seq_len=16", "diffusion.block_size=4",
            "train.steps=10", "optimizer.warmup_steps=1", "tracking.enabled=false"]
    return load_config(None, base + list(overrides))


def tiny_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg, VOCAB, forbidden_ids=[MASK_ID])
    model.eval()
    return model


def score(model, prep):
    """Per-token CE and hits of the read-out rows, through the real megatron model."""
    return model(prep.input_ids, prep.position_ids, prep.layout,
                 output_processor=predict_and_score, output_processor_context=prep.readout)


def hidden(model, input_ids, position_ids, layout):
    """Final hidden states [S, b, h] of every row."""
    return model(input_ids, position_ids, layout,
                 output_processor=lambda hidden_states, **_: hidden_states)


def random_tokens(b, L, generator=None):
    return torch.randint(0, MASK_ID, (b, L), generator=generator)
