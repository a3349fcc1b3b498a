"""`cascade bench attention`: attention alone, forward + backward, side by side in one process.

Rows: AR causal attention at L (the baseline), the block-diffusion 2L layout with the tiled
kernel and with the dense-mask SDPA path, and the shared clean stream `[x_t^1 ; x_t^2 ; x_0]` (3L)
against two separate 2L passes. Timings are medians over alternating repetitions.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from cascade_mega.bench.memory import peak_bytes
from cascade_mega.diffusion import AttentionLayout
from cascade_mega.model.attention import attend
from cascade_mega.runtime import device


def add_arguments(p):
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="end with one JSON line")


def _case(layout, kernel, b, h, d, passes=1):
    gen = torch.Generator().manual_seed(0)  # host draws (the same inputs on every device)
    shape = (b, h, layout.total_len, d)
    dev, dtype = device.current(), torch.bfloat16 if device.on_gpu() else torch.float32
    q, k, v = (torch.randn(shape, generator=gen).to(dev, dtype).requires_grad_()
               for _ in range(3))

    def run():
        for _ in range(passes):
            attend(q, k, v, layout, kernel).sum().backward()

    return run


def run(args) -> dict:
    L, B, b, h, d = args.seq_len, args.block_size, args.batch, args.heads, args.head_dim
    cases = {
        "ar": _case(AttentionLayout("causal", L), "tiled", b, h, d),
        "tiled": _case(AttentionLayout("block_diffusion", L, B), "tiled", b, h, d),
        "dense": _case(AttentionLayout("block_diffusion", L, B), "dense", b, h, d),
        "shared_3L": _case(AttentionLayout("block_diffusion", L, B, 2), "tiled", b, h, d),
        "two_2L": _case(AttentionLayout("block_diffusion", L, B), "tiled", b, h, d, passes=2),
    }
    times = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up: caches, masks
    for _ in range(args.repeats):
        for name, fn in cases.items():
            device.synchronize()
            start = time.perf_counter()
            fn()
            device.synchronize()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_bytes(cases[k]) for k in ("ar", "tiled", "dense")}
    result = {
        "seq_len": L, "block_size": B,
        **{f"{k}_s": v for k, v in med.items()},
        "time_ratio": med["tiled"] / med["ar"],
        "memory_ratio": mem["tiled"] / mem["ar"],
        "dense_time_ratio": med["dense"] / med["ar"],
        "dense_memory_ratio": mem["dense"] / mem["ar"],
        "shared_stream_time_ratio": med["shared_3L"] / med["two_2L"],
    }
    print(f"bench attention  L={L} B={B} batch={b} heads={h} head_dim={d} (forward + backward)")
    for name in cases:
        print(f"  {name:<10}{med[name]:>9.3f} s")
    print(f"  block-diffusion / AR: time {result['time_ratio']:.2f}, memory "
          f"{result['memory_ratio']:.2f}   (dense mask: time {result['dense_time_ratio']:.2f}, "
          f"memory {result['dense_memory_ratio']:.2f})")
    print(f"  shared clean stream 3L / two 2L passes: time "
          f"{result['shared_stream_time_ratio']:.2f}")
    if args.json:
        print(json.dumps(result))
    return result
