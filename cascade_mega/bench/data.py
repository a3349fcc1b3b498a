"""`cascade bench data`: how fast the input pipeline delivers tokens, next to how fast training
consumes them, for one config (default: the quickstart).

The loader side times what every micro-batch costs before the model runs: reading the samples
through megatron-core's GPT dataset (memory-mapped indexed files) and turning them into model
inputs (noise, the [x_t ; x_0] layout). The training side times the trainer's steps on the same
config in the same process. headroom = loader tokens/s / training tokens/s.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from cascade_mega.config import load_config


def add_arguments(p) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                   help="YAML config (default: configs/quickstart.yaml) and dotted overrides")
    p.set_defaults(overrides=[])
    p.add_argument("--batches", type=int, default=200, help="micro-batches the loader reads")
    p.add_argument("--steps", type=int, default=3, help="training steps timed")
    p.add_argument("--json", action="store_true", help="end with one JSON line")


def run(args) -> dict:
    from cascade_mega.train.trainer import Trainer

    config = args.args[0] if args.args and args.args[0].endswith((".yaml", ".yml")) else \
        "configs/quickstart.yaml"
    over = [a for a in args.args if a != config] + list(args.overrides)
    cfg = load_config(config, over + [f"run_dir={tempfile.mkdtemp(prefix='cascade-bench-')}",
                                      "train.resume=none", "tracking.enabled=false"])
    trainer = Trainer(cfg).setup()
    mbs, L = cfg.train.micro_batch_size, cfg.data.seq_len
    start = time.perf_counter()
    consumed = 0
    step = 0
    while consumed < args.batches:
        for _ in trainer._micro_batches(trainer.train_data, step, "train"):
            consumed += 1
        step += 1
    loader_s = time.perf_counter() - start
    loader_tps = consumed * mbs * L / loader_s
    trainer.train_step(0)  # warm-up
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        trainer.train_step(i + 1)
        times.append(time.perf_counter() - t)
    train_tps = cfg.train.global_batch_size * L / statistics.median(times)
    result = {"loader_tokens_per_s": loader_tps, "train_tokens_per_s": train_tps,
              "headroom": loader_tps / train_tps, "backend": "megatron"}
    print(f"bench data  {config}  seq_len {L}, micro-batch {mbs}")
    print(f"  loader (read + prepare)  {loader_tps:12,.0f} tokens/s")
    print(f"  training step            {train_tps:12,.0f} tokens/s")
    print(f"  headroom                 {result['headroom']:12.1f}x")
    if args.json:
        print(json.dumps(result))
    return result
