"""`cascade bench continued`: continued pretraining from a converted AR model against scratch.

The recipe (`configs/recipes/smollm2_135m_cpu.yaml` by default) is trained twice with the same
steps, data and validation noise: from the converted SmolLM2-135M weights (`train.init_from`) and
from a random initialisation of the same architecture (at a from-scratch learning rate); the
`causal` run (`--runs converted,causal`) starts from the converted weights with a causal clean
stream, whose next-token loss (weight 1.0) keeps the AR model in it for speculative decoding; with
`--distill`, a third time from the converted weights with the frozen AR SmolLM2 as teacher. The
printed figure is the validation perplexity bound (exp of the NELBO over t in (t_floor, 1]) at the end,
and its ratio scratch / converted.

Everything missing is prepared first under `--root` (default `runs/smollm2`), so the command runs
on a fresh clone: the Hugging Face model from the GGUF the [hf] extra ships, the block-diffusion and
AR conversions, and Shakespeare in SmolLM2's tokenizer. Finished runs with the same options are
reused; an interrupted one resumes from its checkpoint; one made with other options is trained
again. Runs go to `<root>/<recipe name>/<run>`, so recipes (or a `name=` override) sit side by
side; `--runs converted` trains only the converted run, for comparing recipes, and dotted
overrides apply to every run. Each run is a `cascade train` child process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from cascade_mega.errors import UserError

RECIPE = "configs/recipes/smollm2_135m_cpu.yaml"
RECORD = "bench_overrides.json"  # the options a run was trained with
CAUSAL_AR_WEIGHT = 1.0  # the causal clean stream's next-token loss weight (the quickstart's)


def add_arguments(p) -> None:
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--root", default="runs/smollm2", help="where the models, data and runs go")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's train.steps")
    p.add_argument("--scratch-lr", type=float, default=1e-3,
                   help="learning rate of the from-scratch run (min_lr a tenth of it)")
    p.add_argument("--distill", action="store_true",
                   help="also train with the AR model as distillation teacher")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--runs", default=None,
                   help="which runs to train, comma-separated: converted, scratch, causal (the "
                        "converted weights with a causal clean stream), distilled (with "
                        "--distill); default: converted,scratch (and distilled with --distill); "
                        "e.g. --runs converted to compare recipes")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, as in train")


def _cascade(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "cascade_mega", *args])
    if proc.returncode != 0:
        raise RuntimeError(f"cascade {' '.join(args[:3])} ... failed (exit {proc.returncode})")


def prepare(root: str, cfg) -> dict:
    """The converted models and the tokenised corpus under root (made when missing)."""
    from cascade_mega.data.shakespeare import documents

    paths = {k: os.path.join(root, k) for k in ("hf", "bd", "ar", "plays")}
    if not os.path.isdir(paths["hf"]):
        _cascade("convert", "gguf-to-hf", "smollm2", paths["hf"])
    L, B = str(cfg.data.seq_len), str(cfg.diffusion.block_size)
    if not os.path.isdir(paths["bd"]):
        _cascade("convert", "hf-to-mcore", paths["hf"], paths["bd"], "--objective",
                 "block_diffusion", "--block-size", B, "--seq-len", L)
    if not os.path.isdir(paths["ar"]):
        _cascade("convert", "hf-to-mcore", paths["hf"], paths["ar"], "--objective", "ar",
                 "--seq-len", L)
    if not os.path.isfile(paths["plays"] + ".idx"):
        corpus = paths["plays"] + ".jsonl"
        with open(corpus, "w") as f:
            for doc in documents():
                f.write(json.dumps({"text": doc}) + "\n")
        _cascade("preprocess", corpus, "--output-prefix", paths["plays"], "--tokenizer",
                 os.path.join(paths["bd"], "tokenizer.json"))
    return paths


def _read(run_dir: str, name: str):
    try:
        with open(os.path.join(run_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def final_eval(run_dir: str) -> dict:
    """The first (step 0) and last validation records of a run's metrics.jsonl, and every
    (step, perplexity bound) between."""
    evals = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == "valid":
                evals.append(rec)
    return {"start": evals[0], "end": evals[-1],
            "curve": [(rec["step"], rec["ppl_bound"]) for rec in evals]}


def run(args) -> int:
    from cascade_mega.config import load_config

    root = os.path.abspath(args.root)
    base = [f"data.path={root}/plays", f"data.tokenizer={root}/bd/tokenizer.json",
            *args.overrides]
    if args.steps:
        warmup = load_config(args.recipe, base, world_size=0).optimizer.warmup_steps
        base += [f"train.steps={args.steps}",
                 f"optimizer.warmup_steps={min(warmup, args.steps // 10)}"]
    cfg = load_config(args.recipe, base + [f"run_dir={root}/converted"], world_size=0)
    steps, runs_root = cfg.train.steps, f"{root}/{cfg.name}"  # one folder per recipe (its name)
    runs = {
        "converted": [f"train.init_from={root}/bd"],
        "scratch": ["train.init_from=null", f"optimizer.lr={args.scratch_lr}",
                    f"optimizer.min_lr={args.scratch_lr / 10}"],
        "causal": [f"train.init_from={root}/bd", "diffusion.clean_stream=causal",
                   f"diffusion.ar_loss_weight={CAUSAL_AR_WEIGHT}"],
    }
    if args.distill:
        runs["distilled"] = [f"train.init_from={root}/bd", f"distill.teacher={root}/ar",
                             f"distill.weight={args.distill_weight}"]
    spec = args.runs if args.runs is not None else \
        "converted,scratch" + (",distilled" if args.distill else "")
    chosen = [r.strip() for r in spec.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(runs))
    if unknown or not chosen:
        raise UserError(f"--runs {args.runs!r}: choose among {', '.join(runs)}"
                        + ("" if args.distill else " (distilled needs --distill)"))
    runs = {name: extra for name, extra in runs.items() if name in chosen}
    for name, extra in runs.items():  # every run's config is checked before anything is made
        load_config(args.recipe, base + extra + [f"run_dir={runs_root}/{name}"], world_size=0)
    prepare(root, cfg)
    rows = []
    for name, extra in runs.items():
        run_dir = f"{runs_root}/{name}"
        start, minutes = time.perf_counter(), None  # None: reused from an earlier invocation
        overrides = [*base, *extra, f"run_dir={run_dir}"]
        same = _read(run_dir, RECORD) == overrides
        done = _read(run_dir, "exit.json") or {}
        if not (same and done.get("outcome") == "finished" and done.get("step") == steps):
            print(f"bench continued: training {name} ({steps} steps)", flush=True)
            if not same:  # another invocation's options (or none): not resumable, start over
                shutil.rmtree(run_dir, ignore_errors=True)
                os.makedirs(run_dir)
                with open(os.path.join(run_dir, RECORD), "w") as f:
                    json.dump(overrides, f)
            _cascade("train", args.recipe, *overrides)
            minutes = round((time.perf_counter() - start) / 60, 1)
        ev = final_eval(run_dir)
        rows.append({"run": name, "steps": steps, "start_ppl_bound": ev["start"]["ppl_bound"],
                     "ppl_bound": ev["end"]["ppl_bound"], "nelbo": ev["end"]["nelbo"],
                     "minutes": minutes, "curve": ev["curve"]})
    by = {r["run"]: r for r in rows}
    print(f"\n{'run':<10} {'steps':>5} {'ppl bound at 0':>15} {'ppl bound':>10} {'nelbo':>7} "
          f"{'min':>5}")
    for r in rows:
        print(f"{r['run']:<10} {r['steps']:>5} {r['start_ppl_bound']:>15.1f} "
              f"{r['ppl_bound']:>10.1f} {r['nelbo']:>7.3f} "
              f"{'reused' if r['minutes'] is None else r['minutes']:>6}")
    print("\nvalidation perplexity bound by step")
    for r in rows:
        print(f"  {r['run']:<10} " + "  ".join(f"{s}: {p:.1f}" for s, p in r["curve"]))
    result = {"rows": rows}
    for name in by:
        result[f"{name}_ppl_bound"] = by[name]["ppl_bound"]
    for name in ("scratch", "causal", "distilled"):
        if name in by and "converted" in by:
            ratio = by[name]["ppl_bound"] / by["converted"]["ppl_bound"]
            result[f"{name}_over_converted"] = ratio
            print(f"{name} / converted perplexity bound: {ratio:.3f}x")
    if args.json:
        print(json.dumps(result))
    return 0
