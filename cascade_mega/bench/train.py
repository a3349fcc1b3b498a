"""`cascade bench train`: block-diffusion vs AR training step, same model and L, one process
(an MoE config, e.g. configs/recipes/moe_tiny_cpu.yaml: both through the same experts).

Both trainers are built side by side; timed steps alternate between them (so machine noise hits
both alike) and the median is reported. Peak memory is what one step allocates (activations,
gradients, temporaries; `bench/memory.py`). Printed as ratios block-diffusion / AR, with the model
TFLOP/s of each (`diffusion/flops.py`) and, on a GPU, MFU.

`--clean-stream` also times the next-token loss carried by a causal clean stream
(`diffusion.clean_stream=causal`, (V+1) L rows) against the same loss on an extra causal stream
(block_causal, (V+2) L rows), both at the config's `ar_loss_weight` (0.5 where it has none):
`clean_stream_time_ratio` and `clean_stream_memory_ratio`, causal / extra stream.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from cascade_mega.diffusion import flops
from cascade_mega.bench.memory import peak_bytes
from cascade_mega.config import ONE_PROCESS, load_config
from cascade_mega.runtime import device


def add_arguments(p):
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                   help="YAML config (default: configs/base.yaml, the quickstart's model "
                   "and data at B = 16) and dotted overrides")
    p.set_defaults(overrides=[])
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--batch", type=int, help="sequences per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per objective")
    p.add_argument("--no-dense", action="store_true", help="skip the dense-mask baseline")
    p.add_argument("--no-tracking", action="store_true",
                   help="skip the step time with MLflow tracking on vs off")
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="also time this many ranks (layout from the overrides, default data "
                        "parallel) against one process: parallel_time_ratio")
    p.add_argument("--clean-stream", action="store_true", help="also time a causal clean "
                   "stream's next-token loss against an extra causal stream's")
    p.add_argument("--json", action="store_true", help="end with one JSON line")


def _config_and_overrides(args):
    """The YAML path (default: configs/base.yaml) and the overrides the flags stand for."""
    config = args.args[0] if args.args and args.args[0].endswith((".yaml", ".yml")) else None
    over = [a for a in args.args if a is not config] + list(args.overrides)
    for flag, key in (("layers", "model.num_layers"), ("hidden", "model.hidden_size"),
                      ("heads", "model.num_attention_heads"), ("seq_len", "data.seq_len"),
                      ("block_size", "diffusion.block_size")):
        if getattr(args, flag) is not None:
            over.append(f"{key}={getattr(args, flag)}")
    if args.batch:
        over += [f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}"]
    return config or "configs/base.yaml", over


def _configs(args):
    path, over = _config_and_overrides(args)
    run_dir = tempfile.mkdtemp(prefix="cascade-bench-")
    common = over + ONE_PROCESS + [f"run_dir={run_dir}", "train.resume=none",
                                   "tracking.enabled=false", "train.steps=100",
                                   "optimizer.warmup_steps=1"]
    bd = load_config(path, common + ["diffusion.objective=block_diffusion"])
    dense = load_config(path, common + ["diffusion.objective=block_diffusion",
                                        "model.attention_kernel=dense"])
    ar = load_config(path, common + [  # without what only block diffusion has
        "diffusion.objective=ar", "diffusion.ar_loss_weight=0", "diffusion.views=1",
        "diffusion.complementary=false", "diffusion.clean_stream=block_causal"])
    streams = {}
    if getattr(args, "clean_stream", False):
        w = bd.diffusion.ar_loss_weight or 0.5
        for name, rule in (("extra_stream", "block_causal"), ("causal_clean", "causal")):
            streams[name] = load_config(path, common + [
                "diffusion.objective=block_diffusion", f"diffusion.clean_stream={rule}",
                f"diffusion.ar_loss_weight={w}"])
    return bd, dense, ar, streams


def run(args) -> dict:
    from cascade_mega.train.trainer import Trainer

    bd_cfg, dense_cfg, ar_cfg, streams = _configs(args)
    trainers = {"block_diffusion": Trainer(bd_cfg).setup(), "ar": Trainer(ar_cfg).setup()}
    trainers.update({name: Trainer(cfg).setup() for name, cfg in streams.items()})
    if not args.no_dense:
        trainers["dense_mask"] = Trainer(dense_cfg).setup()
    times = {k: [] for k in trainers}
    for name, tr in trainers.items():  # warm-up (allocator, caches)
        tr.train_step(0)
    for i in range(args.steps):
        for name, tr in trainers.items():
            device.synchronize()
            start = time.perf_counter()
            tr.train_step(i + 1, log=False)
            device.synchronize()
            times[name].append(time.perf_counter() - start)
    memory = {name: peak_bytes(lambda tr=tr: tr.train_step(args.steps + 1))
              for name, tr in trainers.items()}
    from cascade_mega.model.attention import resolve_kernel

    kernel = resolve_kernel(bd_cfg.model.attention_kernel)
    med = {k: statistics.median(v) for k, v in times.items()}
    L, B = bd_cfg.data.seq_len, bd_cfg.diffusion.block_size
    result = {
        "seq_len": L, "block_size": B, "layers": bd_cfg.model.num_layers,
        "hidden": bd_cfg.model.hidden_size, "batch": bd_cfg.train.global_batch_size,
        "bd_step_s": med["block_diffusion"], "ar_step_s": med["ar"],
        "bd_peak_mb": memory["block_diffusion"] / 2**20, "ar_peak_mb": memory["ar"] / 2**20,
        "time_ratio": med["block_diffusion"] / med["ar"],
        "memory_ratio": memory["block_diffusion"] / memory["ar"],
        "experts": bd_cfg.model.moe.num_experts or 0,
        "top_k": bd_cfg.model.moe.top_k if bd_cfg.model.moe.enabled else 0,
    }
    moe = f" experts={result['experts']} top_k={result['top_k']}" if result["experts"] else ""
    print(f"bench train  L={L} B={B} layers={result['layers']} hidden={result['hidden']} "
          f"batch={result['batch']}{moe}")
    vocab = trainers["ar"].tokenizer.vocab_size
    peak = flops.peak_flops()
    for name, cfg in (("bd", bd_cfg), ("ar", ar_cfg)):
        key = "block_diffusion" if name == "bd" else "ar"
        result[f"{name}_tflops"] = flops.step_flops(cfg, vocab) / med[key] / 1e12
        if peak:
            result[f"{name}_mfu"] = result[f"{name}_tflops"] * 1e12 / peak
    if "dense_mask" in med:
        result.update({"dense_step_s": med["dense_mask"],
                       "dense_peak_mb": memory["dense_mask"] / 2**20,
                       "dense_time_ratio": med["dense_mask"] / med["ar"],
                       "dense_memory_ratio": memory["dense_mask"] / memory["ar"]})
    print(f"  {'objective':<28}{'step (s)':>10}{'peak (MiB)':>12}")
    for name, label in (("block_diffusion", f"block_diffusion ({kernel})"),
                        ("dense_mask", "block_diffusion (dense mask)"), ("ar", "ar")):
        if name in med:
            print(f"  {label:<28}{med[name]:>10.3f}{memory[name] / 2**20:>12.1f}")
    print(f"  time ratio (bd/ar) {result['time_ratio']:.2f}   "
          f"memory ratio (bd/ar) {result['memory_ratio']:.2f}")
    print(f"  model TFLOP/s (flops.py: the 2L rows in every matmul, attention over the mask's "
          f"non-zeros): bd {result['bd_tflops']:.3f}   ar {result['ar_tflops']:.3f}" +
          (f"   MFU bd {result['bd_mfu']:.1%}   ar {result['ar_mfu']:.1%}" if peak else
           "   (MFU: GPU only)"))
    if streams:
        result.update({
            "extra_stream_step_s": med["extra_stream"], "causal_clean_step_s": med["causal_clean"],
            "clean_stream_time_ratio": med["causal_clean"] / med["extra_stream"],
            "clean_stream_memory_ratio": memory["causal_clean"] / memory["extra_stream"]})
        print(f"  next-token loss on the causal clean stream vs an extra causal stream (weight "
              f"{streams['causal_clean'].diffusion.ar_loss_weight}): step "
              f"{med['causal_clean']:.3f} s vs {med['extra_stream']:.3f} s (ratio "
              f"{result['clean_stream_time_ratio']:.2f}), peak {memory['causal_clean'] / 2**20:.1f} "
              f"vs {memory['extra_stream'] / 2**20:.1f} MiB (ratio "
              f"{result['clean_stream_memory_ratio']:.2f})")
    if "dense_time_ratio" in result:
        print(f"  dense-mask baseline: time ratio {result['dense_time_ratio']:.2f}   "
              f"memory ratio {result['dense_memory_ratio']:.2f}")
    if not args.no_tracking:
        result.update(tracking_overhead(trainers["block_diffusion"], args.steps,
                                        args.steps + 2))
    if args.nproc_per_node:
        result.update(parallel_ratio(args, bd_cfg))
    if args.json:
        print(json.dumps(result))
    return result


def tracking_overhead(trainer, steps: int, first_step: int) -> dict:
    """Step time with the MLflow tracker (default sqlite store, a metric batch every step: ten
    times the quickstart's logging) against the same trainer without it, in alternating phases
    off / on / off / on; each `on` phase is a tracked run that starts, logs and finishes."""
    from cascade_mega.train.callbacks import MlflowTracker

    times = {"off": [], "on": []}
    step = first_step
    for phase in ("off", "on", "off", "on"):
        tracker = MlflowTracker(trainer.cfg, trainer.cfg.run_dir) if phase == "on" else None
        if tracker:
            tracker.on_train_start(trainer)
        for _ in range(max(steps, 3)):
            start = time.perf_counter()
            metrics = trainer.train_step(step)
            if tracker:
                tracker.on_step_end(trainer, step, metrics)
            times[phase].append(time.perf_counter() - start)
            step += 1
        if tracker:
            trainer.outcome = "finished"
            tracker.on_train_end(trainer)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"  MLflow tracking (sqlite, every step): step {on:.3f} s vs {off:.3f} s untracked, "
          f"overhead {on / off - 1:+.1%}")
    return {"tracked_step_s": on, "untracked_step_s": off, "tracking_overhead": on / off - 1}


def _median_step_time(config_args, run_dir, nproc):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cascade_mega", "train", *config_args, f"run_dir={run_dir}"]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark run failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = [json.loads(line)["step_time"] for line in f if '"train"' in line]
    return statistics.median(times[1:] or times)  # the first step warms caches


def parallel_ratio(args, cfg) -> dict:
    """Step time of an N-rank run over the one-process run of the same config (subprocesses)."""
    config, over = _config_and_overrides(args)
    steps = max(3, args.steps + 1)
    common = [config, *over, f"train.steps={steps}", "train.log_interval=1",
              "train.eval_interval=0", "tracking.enabled=false", "optimizer.warmup_steps=1",
              f"checkpoint.interval={steps + 1}", "train.resume=none"]
    single_over = [o for o in common if not o.startswith("parallel.")] + ONE_PROCESS
    if not any(o.startswith("parallel.") for o in over):  # data parallel: same global batch
        micro = max(1, cfg.train.global_batch_size // args.nproc_per_node)
        single_over.append(f"train.micro_batch_size={micro}")
        common.append(f"train.micro_batch_size={micro}")
    root = tempfile.mkdtemp(prefix="cascade-bench-parallel-")
    one = _median_step_time(single_over, f"{root}/one", 1)
    many = _median_step_time(common, f"{root}/many", args.nproc_per_node)
    print(f"  {args.nproc_per_node} ranks: step {many:.3f} s   one process: {one:.3f} s   "
          f"parallel time ratio {many / one:.2f}")
    return {"parallel_step_s": many, "single_step_s": one, "parallel_time_ratio": many / one}
