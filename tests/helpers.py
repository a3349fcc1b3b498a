"""Small builders shared by tests."""

from __future__ import annotations

import io
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cascade(*args, env=None) -> subprocess.CompletedProcess:
    """`cascade ARGS` run in this process from the repository root (the command line's own
    `main`, no interpreter start per call): its exit code and what it printed, as a finished
    subprocess gives them. Commands that launch processes (torchrun, Slurm) still do."""
    from cascade_mega.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved, cwd = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    os.chdir(ROOT)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as stop:  # argparse's own errors
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
