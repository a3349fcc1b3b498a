"""Model FLOPs of a training step, and MFU against the GPU's dense bf16 peak.

Counted honestly for block diffusion: every row the model runs goes through every matmul, so the
`[x_t ; x_0]` layout costs its (V+1) L rows in the linear layers, not L; attention counts the keys
each query row is allowed to see (the mask's non-zeros), not the dense square, since the kernels
skip the masked tiles. Per layer, for S rows (2 FLOPs per multiply-add):

    QKV 2 S h (a + 2g) d,  scores and values 4 a d nnz(mask),  output projection 2 S a d h,
    SwiGLU MLP 6 S h f;    read-out 2 n h V on the n rows that carry a prediction.

An MoE layer (`model.moe`) counts its active parameters: each row through top-k experts of FFN
f_e and the shared expert f_s, 6 S h (k f_e + f_s), plus the router 2 S h E (and the shared
expert's gate 2 S h); the dense layers of the pattern count 6 S h f.

S, n and nnz are the objective's own answers (`SequenceLayout`: rows, readout, pairs; e.g. AR
L (L + 1) / 2, block diffusion (V + 1) L (L + B) / 2, `diffusion/block.py`).
A step is 3 forwards' worth (forward + backward), times the global batch; full recompute reruns
the forward but MFU counts model FLOPs, as Megatron does. A distillation teacher adds one forward
of its own (an AR model of the teacher's size) per sequence.

It lives with the objectives because the count is the model's dimensions (`model/dims.py`) run
over the objective's layout (`config/objectives.py: layout_of`): the trainer (MFU), `cascade
submit`'s time-limit check, sweep planning and `cascade bench` all read it from here.
"""

from __future__ import annotations

import torch

from cascade_mega.config.objectives import layout_of
from cascade_mega.model.dims import model_dims

# dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets)
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def forward_flops(cfg, vocab: int) -> tuple[float, float]:
    """(matmul FLOPs of the linear layers and the read-out, attention FLOPs) of one sequence."""
    x, layout = model_dims(cfg, vocab), layout_of(cfg)
    S = layout.rows
    h, a, g, dh, f = x["h"], x["a"], x["g"], x["d"], x["f"]
    attention = 2 * S * h * (a + 2 * g) * dh + 2 * S * a * dh * h
    linear = cfg.model.num_layers * attention + sum(mlp_flops(cfg, S, h, f))
    return (linear + 2 * layout.readout * h * x["V"],
            cfg.model.num_layers * 4 * a * dh * layout.pairs)


def mlp_flops(cfg, S: int, h: int, f: int) -> list:
    """Forward FLOPs of each layer's MLP for S rows: dense SwiGLU, or an MoE layer's active
    experts, shared expert and router."""
    moe = cfg.model.moe
    if not moe.enabled:
        return [6 * S * h * f] * cfg.model.num_layers
    f_e = moe.ffn_hidden_size or f
    sparse = 6 * S * h * (moe.top_k * f_e + moe.shared_expert_size) + 2 * S * h * (
        moe.num_experts + int(moe.shared_expert_gate))
    return [sparse if on else 6 * S * h * f for on in cfg.model.moe_pattern]


def step_flops(cfg, vocab: int, teacher=None) -> float:
    """Model FLOPs of one training step (forward and backward, the whole global batch); teacher:
    a distillation teacher's config (`diffusion/distill.py: teacher_config`), one forward of it."""
    flops = 3.0 * sum(forward_flops(cfg, vocab))
    if teacher is not None:
        flops += sum(forward_flops(teacher, vocab))
    return flops * cfg.train.global_batch_size


def peak_flops() -> float | None:
    """This GPU's dense bf16 peak, or None (CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
