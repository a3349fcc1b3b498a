"""`cascade eval RUN [RUN ...] --tasks T1,T2`: lm-evaluation-harness tasks on runs, side by side.

    cascade eval runs/quickstart runs/ar_quickstart --tasks shakespeare_next_line,shakespeare_cloze
    cascade eval RUN --tasks my_task --include-path ~/tasks --limit 50 --mc-samples 64 --json

Tasks are found first among the task YAMLs of `configs/eval/` and of each `--include-path`
folder (a task's `dataset_kwargs.data_files` are resolved relative to its YAML file), then among
lm-eval's own tasks. Machines without internet access cannot download a standard task's dataset:
copy the task's YAML into a folder of your own, set `dataset_path: json` (or parquet, csv) and
`dataset_kwargs: {data_files: {test: PATH}}` to the local copy, and pass that folder as
`--include-path` (docs/evaluation.md). Everything is checked (lm-eval installed, every task
known, every data file present) before a model loads.

Diffusion runs report bounds: their log-likelihoods are minus the NELBO (a lower bound), so a
perplexity is an upper bound and accuracies compare bounds (`evaluation/likelihood.py`). The
results print as a table (one column per run), with `--json` as one JSON object on the last line,
and go to each run's MLflow run as `eval/<task>/<metric>` when the run is tracked.
"""

from __future__ import annotations

import json
import os
import sys
import time

from cascade_mega.config import ConfigError, PRECISIONS
from cascade_mega.inference.policies import POLICIES, Policy

TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "eval")


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", help="run directories or checkpoint folders")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", action="append", default=[],
                   help="a folder of task YAMLs (besides configs/eval); repeatable")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--mc-samples", type=int, default=32, help="noise draws per NELBO bound "
                   "(diffusion runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws and sampling")
    p.add_argument("--batch", type=int, default=64, help="sequences per forward")
    p.add_argument("--policy", choices=POLICIES, default=Policy.name,
                   help="decoding policy of generate_until and is_greedy (diffusion runs)")
    p.add_argument("--steps", type=int, default=Policy.steps)
    p.add_argument("--tau", type=float, default=Policy.tau)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="weights and activations (default fp32: scores comparable across runs)")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON "
                   "object on the last line")


def local_tasks(include_paths) -> dict:
    """name -> YAML path of every task under configs/eval and the include paths."""
    import yaml

    found = {}
    for folder in [TASKS_DIR, *include_paths]:
        if not os.path.isdir(folder):
            raise ConfigError(f"--include-path {folder}: no such folder")
        for name in sorted(os.listdir(folder)):
            if name.endswith((".yaml", ".yml")):
                path = os.path.join(folder, name)
                try:
                    spec = yaml.safe_load(open(path, encoding="utf-8"))
                except yaml.YAMLError as err:
                    raise ConfigError(f"{path}: not a YAML task ({err})") from None
                if isinstance(spec, dict) and isinstance(spec.get("task"), str):
                    found[spec["task"]] = path
    return found


def task_config(path: str) -> dict:
    """The task's YAML as lm-eval's config dict, its data files resolved and checked."""
    import yaml

    spec = yaml.safe_load(open(path, encoding="utf-8"))
    files = (spec.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        named = files if isinstance(files, dict) else {"data": files}
        resolved = {}
        for split, value in named.items():
            paths = [value] if isinstance(value, str) else list(value)
            paths = [p if os.path.isabs(p) else os.path.join(os.path.dirname(path), p)
                     for p in paths]
            for p in paths:
                if not os.path.isfile(p):
                    raise ConfigError(f"task {spec['task']} ({path}): its data file {p} does "
                                      "not exist")
            resolved[split] = paths[0] if len(paths) == 1 else paths
        spec["dataset_kwargs"] = {**spec["dataset_kwargs"], "data_files":
                                  resolved if isinstance(files, dict) else resolved["data"]}
    return spec


def resolve_tasks(names, include_paths) -> list:
    local = local_tasks(include_paths)
    out, standard = [], None
    for name in names:
        if name in local:
            out.append(task_config(local[name]))
            continue
        if standard is None:
            from lm_eval.tasks import TaskManager

            standard = set(TaskManager().all_tasks)
        if name not in standard:
            raise ConfigError(f"unknown task {name!r}: the local tasks are "
                              f"{', '.join(sorted(local)) or 'none'} (configs/eval and "
                              "--include-path), besides lm-eval's own")
        out.append(name)
    return out


def _metrics(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results ("acc,none" -> "acc")."""
    out = {}
    for task, values in results["results"].items():
        out[task] = {k.split(",")[0]: v for k, v in values.items()
                     if k not in ("alias", "sample_len") and isinstance(v, (int, float))}
    return out


def log_to_mlflow(run_path: str, metrics: dict) -> str:
    """Log `eval/<task>/<metric>` to the run's MLflow run; what happened, in a few words."""
    from cascade_mega.config import load_config
    from cascade_mega.tracking import store
    from cascade_mega.train.callbacks.tracking import RUN_ID_FILE
    from cascade_mega.checkpoint import locate

    config, _ = locate(run_path)
    run_dir = os.path.dirname(config)
    id_file = os.path.join(run_dir, RUN_ID_FILE)
    if not os.path.isfile(id_file):
        return "not tracked (no MLflow run): not logged"
    cfg = load_config(config, [], world_size=0)
    uri = store.resolve_uri(cfg)
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        run_id = open(id_file).read().strip()
        now = int(time.time() * 1000)
        batch = [Metric(f"eval/{task}/{name}", float(value), now, 0)
                 for task, values in metrics.items() for name, value in values.items()]
        MlflowClient(uri).log_batch(run_id, metrics=batch)
    except Exception as err:  # a dead server or a gone run: the results are printed anyway
        store.warn(f"the results of {run_path} were not logged to MLflow ({uri}): "
                   f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
        return "not logged"
    return f"logged to MLflow run {run_id}"


def _table(columns: dict, bounds: dict) -> str:
    """One row per task / metric, one column per run: value (+- its standard error)."""
    rows = sorted({(t, m) for r in columns.values() for t, ms in r.items() for m in ms
                   if not m.endswith("_stderr")})
    names = list(columns)
    width = max([len(f"{t}/{m}") for t, m in rows] + [12])
    head = f"{'task/metric':<{width}}" + "".join(f"  {n[-28:]:>28}" for n in names)
    lines = [head, "-" * len(head)]
    for t, m in rows:
        cells = []
        for n in names:
            v, se = columns[n].get(t, {}).get(m), columns[n].get(t, {}).get(m + "_stderr")
            text = "-" if v is None else f"{v:.4g}" + (f" +- {se:.2g}" if se is not None else "")
            cells.append(f"  {text:>28}")
        lines.append(f"{f'{t}/{m}':<{width}}" + "".join(cells))
    kinds = ", ".join(f"{n}: {'bounds (-NELBO; perplexity an upper bound)' if b else 'exact'}"
                      for n, b in bounds.items())
    lines.append(f"log-likelihoods: {kinds}")
    return "\n".join(lines)


def run(args) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("cascade eval needs lm-evaluation-harness: pip install "
                          "'cascade-mega[eval]' (lm-eval==0.4.13)") from None
    for flag in ("mc_samples", "batch", "steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got "
                              f"{getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    try:
        policy = Policy(args.policy, args.steps, args.tau)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise ConfigError("--tasks names no task")
    tasks = resolve_tasks(names, args.include_path)
    from lm_eval import simple_evaluate

    from cascade_mega.evaluation.harness import CascadeLM
    from cascade_mega.inference.load import load_decoder

    columns, bounds, notes = {}, {}, {}
    for path in args.runs:
        decoder = load_decoder(path, precision=args.precision)
        net = decoder.net
        lm = CascadeLM(net.cfg, net.tok, net.model, decoder, args.mc_samples, args.seed, policy,
                       args.batch)
        results = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, bootstrap_iters=100,
                                  random_seed=args.seed, numpy_random_seed=args.seed,
                                  torch_random_seed=args.seed, fewshot_random_seed=args.seed)
        if lm.rank != 0:
            continue
        columns[path] = _metrics(results)
        bounds[path] = not lm.ar
        notes[path] = log_to_mlflow(path, columns[path])
    if not columns:  # a rank other than the first: rank 0 prints
        return 0
    print(_table(columns, bounds))
    for path, note in notes.items():
        print(f"{path}: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"runs": columns, "bounds": bounds, "mc_samples": args.mc_samples}))
    return 0
