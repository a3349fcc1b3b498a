"""The GPU acceptance run: what a CPU cannot prove, measured on one GPU in a few minutes.

    python tools/gpu_check.py --out DIR [--phases A,B,C,D]      # on a GPU host (tools/README.md)
    python tools/gpu_check.py --cpu-dry-run --out DIR           # the same script, tiny, on a CPU

Phases (each writes DIR/gpu_check_<P>.json as soon as it ends; a failing phase records its error
and the next one runs):
  A  attention: FlexAttention and the tiled kernel on the device against dense fp32 attention (TF32
     off), outputs and gradients, for several (L, B, views, grouped-query heads, documents; an L
     that is not a multiple of 128), in fp32 and bf16; and context parallel's kernels in one
     process: each rank's chunks of a 2-rank group against the whole sequence.
  B  `cascade bench train` on a ~350M-parameter model in bf16: block-diffusion / AR step time and
     peak memory, model TFLOP/s and MFU of both.
  C  100 steps of a small block-diffusion training (and of its AR twin): the loss must fall; then
     both checkpoints decoded (block decoding, AR decoding): tokens/s.
  D  FP8 (train.fp8=hybrid) for a few steps where Transformer Engine imports; otherwise the phase
     reports "skipped: no Transformer Engine".
Tracking stays off: MLflow is never imported (the GPU host gets only the wheels it needs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

PHASES = "ABCD"


def _dense(q, k, v, mask, scale=None):
    """fp32 dense reference; mask [S, S] or [b, 1, S, S], True = may attend."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.float()


def _err(a, b) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def phase_a(dev, dry: bool) -> dict:
    from cascade_kernels import flex, tiled
    from cascade_mega.diffusion.masks import AttentionLayout

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = [(32, 4, 1, 4, 4, False), (48, 4, 2, 4, 2, False), (32, 4, 1, 4, 2, True)] if dry \
        else [(512, 16, 1, 16, 16, False), (384, 16, 2, 16, 4, False), (200, 8, 1, 8, 2, False),
              (192, 16, 1, 8, 2, False),
              (1024, 32, 1, 16, 8, True), (320, 16, 2, 8, 8, True)]
    tol = {torch.float32: 2e-3, torch.bfloat16: 5e-2}
    rows, gen = [], torch.Generator().manual_seed(0)
    for L, B, V, h, g, docs in cases:
        documents = None
        if docs:  # two sequences, each with documents ending at 3 random places
            documents = torch.stack([torch.bucketize(torch.arange(L), torch.randperm(
                L - 1, generator=gen)[:3].add(1).sort().values, right=True) for _ in range(2)])
        layout = AttentionLayout("block_diffusion", L, B, V, documents=documents)
        mask = layout.dense(dev)
        S = layout.total_len
        base = [torch.randn(2, n, S, 64, generator=gen) for n in (h, g, g)]
        grad = torch.randn(2, h, S, 64, generator=gen).to(dev)
        ref_in = [x.to(dev, copy=True).requires_grad_() for x in base]
        ref = _dense(*ref_in, mask)
        ref_grads = torch.autograd.grad(ref, ref_in, grad, retain_graph=True)
        for dtype in (torch.float32, torch.bfloat16):
            kernels = ["flex", "tiled"] + (["tiled_cp"] if L % (4 * B) == 0 else [])
            docs_on = None if documents is None else documents.to(dev)
            for kernel in kernels:
                backward = dev.type == "cuda" or kernel != "flex"  # flex: no CPU backward
                x = [t.to(dev, dtype, copy=True).requires_grad_(backward) for t in base]
                row = {"kernel": kernel, "L": L, "B": B, "views": V, "heads": h, "groups": g,
                       "documents": docs, "dtype": str(dtype).split(".")[-1]}
                if kernel == "tiled_cp":  # each rank of 2 in turn: its chunks, the whole prefix
                    errs, grad_errs = [], []
                    for rank in range(2):
                        split = layout.split_for_context(rank, 2)
                        held = split.rows().to(dev)
                        clean = slice(V * L, (V + 1) * L)
                        out = tiled.block_diffusion_attention(
                            x[0][:, :, held], x[1][:, :, held], x[2][:, :, held], L, B, V,
                            chunks=split.chunks, num_chunks=split.num_chunks,
                            clean_kv=(x[1][:, :, clean], x[2][:, :, clean]), documents=docs_on)
                        errs.append(_err(out, ref[:, :, held]))
                        g_rows = grad[:, :, held]
                        got = torch.autograd.grad(out, x, g_rows.to(dtype))
                        want = torch.autograd.grad(ref[:, :, held], ref_in, g_rows,
                                                   retain_graph=True)
                        grad_errs += [_err(a, e) for a, e in zip(got, want)]
                    row["out_err"], row["grad_err"] = max(errs), max(grad_errs)
                else:
                    out = flex.attention(*x, layout) if kernel == "flex" else \
                        tiled.block_diffusion_attention(*x, L, B, V, documents=docs_on)
                    row["out_err"] = _err(out, ref)
                    if backward:
                        got = torch.autograd.grad(out, x, grad.to(dtype))
                        row["grad_err"] = max(_err(a, e) for a, e in zip(got, ref_grads))
                row["ok"] = max(row["out_err"], row.get("grad_err", 0.0)) < tol[dtype]
                rows.append(row)
                print(f"  A {kernel:<8} L={L:<5} B={B:<3} V={V} h/g={h}/{g} docs={int(docs)} "
                      f"{row['dtype']:<8} out {row['out_err']:.2e} grad "
                      f"{row.get('grad_err', float('nan')):.2e} {'ok' if row['ok'] else 'FAIL'}",
                      flush=True)
    return {"cases": rows, "ok": all(r["ok"] for r in rows)}


def phase_b(dev, dry: bool) -> dict:
    from cascade_mega.bench import train as bench_train

    size = ["--layers", "2", "--hidden", "64", "--heads", "4", "--seq-len", "64",
            "--block-size", "16", "--batch", "2", "--steps", "2"] if dry else \
        ["--layers", "24", "--hidden", "1024", "--heads", "16", "--seq-len", "2048",
         "--block-size", "16", "--batch", "8", "--steps", "5"]
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["configs/base.yaml", "train.precision=bf16", *size, "--no-tracking"])
    result = bench_train.run(args)
    return {**result, "ok": result["time_ratio"] > 0}


def _train(cfg_path: str, overrides: list):
    from cascade_mega.config import load_config
    from cascade_mega.train.callbacks import MetricsFile
    from cascade_mega.train.trainer import Trainer

    cfg = load_config(cfg_path, overrides)
    trainer = Trainer(cfg, [MetricsFile(cfg.run_dir)]).setup().fit()
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"train"' in line]
    return trainer, losses


def phase_c(dev, dry: bool, work: str) -> dict:
    from cascade_mega.inference import load_decoder
    from cascade_mega.inference.policies import Policy
    from cascade_mega.inference.sampling import Sampling

    size = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
            "data.seq_len=64", "diffusion.block_size=16", "train.micro_batch_size=4",
            "train.global_batch_size=4"] if dry else \
        ["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
         "data.seq_len=512", "diffusion.block_size=16", "train.micro_batch_size=16",
         "train.global_batch_size=16"]
    common = size + ["train.steps=100", "train.log_interval=1", "train.eval_interval=0",
                     "optimizer.warmup_steps=10", "optimizer.lr=3e-3", "checkpoint.interval=100",
                     "tracking.enabled=false", "train.resume=none"]
    out = {}
    for name, extra in (("bd", []), ("ar", ["diffusion.objective=ar"])):
        start = time.perf_counter()
        _, losses = _train("configs/base.yaml", common + extra + [f"run_dir={work}/{name}"])
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        out[f"{name}_train_s"] = time.perf_counter() - start
        out[f"{name}_loss_first10"], out[f"{name}_loss_last10"] = first, last
        out[f"{name}_loss_falls"] = last < first - 0.5  # nats per token, over 100 steps
        decoder = load_decoder(f"{work}/{name}")
        prompts = [[5, 6, 7, 8, 9, 10, 11, 12]] * (2 if dry else 8)
        new = 32 if dry else 256
        decoder.generate(prompts[:1], 16, Policy("adaptive", steps=3), Sampling())  # warm-up
        start = time.perf_counter()
        gens = decoder.generate(prompts, new, Policy("adaptive", steps=3),
                                Sampling(greedy=False, top_p=0.9))
        seconds = time.perf_counter() - start
        tokens = sum(len(g.tokens) for g in gens)
        out[f"{name}_decode_tokens_per_s"] = tokens / seconds
        out[f"{name}_decode_batch"] = len(prompts)
        print(f"  C {name}: loss {first:.3f} -> {last:.3f}, decode {tokens / seconds:.1f} "
              f"tokens/s (batch {len(prompts)})", flush=True)
    out["ok"] = out["bd_loss_falls"] and out["ar_loss_falls"]
    return out


def phase_d(dev, dry: bool, work: str) -> dict:
    from cascade_mega.runtime import te_support

    if not te_support.available():
        why = te_support.import_error()
        return {"status": "skipped: no Transformer Engine" + (f" ({why})" if why else ""),
                "ok": True}
    _, losses = _train("configs/base.yaml", [
        "model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
        "data.seq_len=512", "train.micro_batch_size=16", "train.global_batch_size=16",
        "train.steps=20", "train.log_interval=1", "train.eval_interval=0",
        "optimizer.warmup_steps=2", "tracking.enabled=false", "train.resume=none",
        "checkpoint.interval=100", "train.precision=bf16", "train.fp8=hybrid",
        "model.attention_backend=te", f"run_dir={work}/fp8"])
    return {"status": "ran", "losses": losses, "ok": losses[-1] < losses[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default=PHASES, help="e.g. A,C (default: all)")
    p.add_argument("--out", default="gpu_check", help="folder of the JSON files")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on this CPU")
    args = p.parse_args(argv)
    phases = [x for x in args.phases.replace(",", "").upper() if x in PHASES]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.cpu_dry_run:
        p.error("no CUDA device here: pass --cpu-dry-run to run the tiny CPU version")
    os.chdir(ROOT)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="cascade-gpu-check-")
    from cascade_mega.cli import _quiet
    from cascade_mega.config import ParallelConfig
    from cascade_mega.runtime import distributed

    _quiet()
    distributed.init(ParallelConfig(), seed=1234)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if
           dev.type == "cuda" else "cpu", "cuda": torch.version.cuda, "dry_run": args.cpu_dry_run}
    print(f"gpu_check on {env['device']} (torch {env['torch']}, CUDA {env['cuda']})", flush=True)
    failed = False
    for phase in phases:
        start = time.perf_counter()
        try:
            fn = {"A": phase_a, "B": phase_b}.get(phase)
            result = fn(dev, args.cpu_dry_run) if fn else \
                {"C": phase_c, "D": phase_d}[phase](dev, args.cpu_dry_run, work)
        except Exception as err:  # noqa: BLE001  a phase that fails is recorded, the next runs
            result = {"ok": False, "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-4000:]}
        result.update(phase=phase, seconds=time.perf_counter() - start, env=env,
                      mlflow_imported="mlflow" in sys.modules)
        failed |= not result["ok"]
        with open(os.path.join(args.out, f"gpu_check_{phase}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"phase {phase}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.1f} s"
              + (f" ({result['error']})" if "error" in result else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
