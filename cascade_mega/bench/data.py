"""`cascade bench data`: how fast the input pipeline delivers tokens, next to how fast training
consumes them, for one config (default: configs/base.yaml, the quickstart's model and data).

The loader side times what every micro-batch costs before the model runs: reading the samples
(each backend: megatron-core's GPT dataset read in the step, and the DALI pipeline when the [dali]
extra is installed) and turning them into model inputs (noise, the [x_t ; x_0] layout). The
training side times the trainer's steps on the same config in the same process.
headroom = loader tokens/s / training tokens/s (of the default backend; `dali_headroom` for DALI).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from cascade_mega.config import load_config


def add_arguments(p) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                   help="YAML config (default: configs/base.yaml, the quickstart's model "
                   "and data at B = 16) and dotted overrides")
    p.set_defaults(overrides=[])
    p.add_argument("--batches", type=int, default=200, help="micro-batches the loader reads")
    p.add_argument("--steps", type=int, default=3, help="training steps timed")
    p.add_argument("--json", action="store_true", help="end with one JSON line")


def run(args) -> dict:
    from cascade_mega.train.trainer import Trainer

    config = args.args[0] if args.args and args.args[0].endswith((".yaml", ".yml")) else \
        "configs/base.yaml"
    over = [a for a in args.args if a != config] + list(args.overrides)
    cfg = load_config(config, over + [f"run_dir={tempfile.mkdtemp(prefix='cascade-bench-')}",
                                      "train.resume=none", "tracking.enabled=false"])
    trainer = Trainer(cfg).setup()
    mbs, L = cfg.train.micro_batch_size, cfg.data.seq_len
    readers = {"megatron": trainer.train_data}
    from cascade_mega.data import dali_loader

    if dali_loader.available():
        readers["dali"] = dali_loader.DaliReader(
            trainer.train_data.dataset, cfg, trainer.tokenizer.vocab_size, trainer.dp_rank,
            trainer.dp_size, trainer.num_micro, 0)
    loader_tps = {name: _loader_tokens_per_s(trainer, reader, args.batches) * mbs * L
                  for name, reader in readers.items()}
    trainer.train_step(0)  # warm-up
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        trainer.train_step(i + 1)
        times.append(time.perf_counter() - t)
    train_tps = cfg.train.global_batch_size * L / statistics.median(times)
    result = {"loader_tokens_per_s": loader_tps["megatron"], "train_tokens_per_s": train_tps,
              "headroom": loader_tps["megatron"] / train_tps, "backend": "megatron"}
    if "dali" in loader_tps:
        result.update(dali_tokens_per_s=loader_tps["dali"],
                      dali_headroom=loader_tps["dali"] / train_tps)
    print(f"bench data  {config}  seq_len {L}, micro-batch {mbs}")
    for name, tps in loader_tps.items():
        print(f"  loader {name:9s} (read + prepare) {tps:12,.0f} tokens/s   "
              f"headroom {tps / train_tps:8.1f}x")
    print(f"  training step                     {train_tps:12,.0f} tokens/s")
    if "dali" not in loader_tps:
        print(f"  (dali: not installed; {dali_loader.EXTRA})")
    if args.json:
        print(json.dumps(result))
    return result


def _loader_tokens_per_s(trainer, reader, batches: int) -> float:
    """Micro-batches per second through `reader`, read in training order and prepared."""
    start, consumed, step = time.perf_counter(), 0, 0
    while consumed < batches:
        for _ in trainer.objective.batch(reader, step, "train").make():
            consumed += 1
        step += 1
    return consumed / (time.perf_counter() - start)
