"""`cascade sweep`: run a sweep file's grid, then fit scaling laws to what it measured.

    cascade sweep SWEEP.yaml [KEY=VALUE ...] [--executor local|slurm] [--cluster P] [--dry-run]
    cascade sweep fit SWEEP.yaml [--bootstrap N]

The first expands the grid (`spec.py`), checks every run (config at the job's world size, and on
Slurm the cluster profile) and prints each run's N, D and FLOPs (and device-hours on a cluster
profile) before anything runs; re-running it skips finished runs and resumes unfinished ones.
The second reads the final losses from MLflow and writes tables and plots to <root>/fit/.
"""

from __future__ import annotations

import argparse

from cascade_mega.config import ConfigError


def add_arguments(p) -> None:
    p.add_argument("args", nargs="+", metavar="[fit] SWEEP.yaml [KEY=VALUE ...]",
                   help="a sweep file (configs/sweeps/), or `fit` and a sweep file")
    p.set_defaults(overrides=[])
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: one run after the other here; slurm: one job array")
    p.add_argument("--cluster", help="cluster profile for --executor slurm (default: the "
                                     "sweep's `cluster:`)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs and their compute; run or submit nothing")
    p.add_argument("--root", help="run directories and the sweep's store here instead of the "
                                  "sweep file's `root:` (e.g. a second copy of a sweep)")
    p.add_argument("--bootstrap", type=int, default=200, help="fit: bootstrap resamples")


def _table(runs, states, profile=None) -> str:
    rate = profile.device_tflops * 1e12 * profile.assumed_mfu if profile else None
    head = f"{'run':32} {'objective':9} {'N':>9} {'D':>9} {'FLOPs':>9}"
    head += f" {'dev-hours':>9}" if rate else ""
    lines = [head + "  state"]
    for r in runs:
        line = f"{r.name:32} {r.label:9} {r.params:9.3g} {r.tokens:9.3g} {r.flops:9.3g}"
        line += f" {r.flops / rate / 3600:9.3g}" if rate else ""
        lines.append(f"{line}  {states[r.name]}")
    total = sum(r.flops for r in runs)
    foot = f"{len(runs)} runs, {total:.3g} FLOPs"
    if rate:
        foot += f", {total / rate / 3600:.3g} device-hours at {profile.device_tflops:g} TFLOP/s " \
                f"x MFU {profile.assumed_mfu:g} ({profile.name})"
    return "\n".join(lines + [foot])


def _run(args, path: str, overrides) -> int:
    from cascade_mega.sweep import execute
    from cascade_mega.sweep.spec import expand, load_sweep

    sweep = load_sweep(path, args.root)
    profile = res = None
    world = 1
    if args.executor == "slurm":
        from cascade_mega.slurm.profile import load_profile
        from cascade_mega.slurm.submit import resources

        name = args.cluster or sweep.cluster
        if not name:
            raise ConfigError(f"{path}: --executor slurm needs a cluster profile "
                              "(--cluster NAME or `cluster:` in the sweep file)")
        profile = load_profile(name)
        res = resources(profile, argparse.Namespace(
            nodes=sweep.nodes, gpus_per_node=None, time=sweep.time, partition=None,
            dry_run=args.dry_run))
        world = res.nodes * res.tasks_per_node
    runs = expand(sweep, overrides, world)
    if args.executor == "slurm":
        execute.check_slurm(sweep, runs, profile, res, args.dry_run)
    states = {r.name: execute.run_state(r) for r in runs}
    print(_table(runs, states, profile), flush=True)
    if args.dry_run:
        return 0
    parent = execute.parent_run(sweep, runs)
    for r in runs:
        r.cfg.tracking.parent_run_id = parent
    paths = execute.freeze(sweep, runs)
    if args.executor == "slurm":
        out = execute.run_slurm(sweep, runs, states, paths, profile, res, False)
        print(f"submitted job {out['job_id']}: {len(out['run_dirs'])} runs" if out["job_id"]
              else "nothing to submit: every run is finished or queued", flush=True)
        return 0
    done = execute.run_local(sweep, runs, states, paths)
    final = {**states, **done}
    failed = [n for n, s in final.items() if s != "finished"]
    print(f"sweep {sweep.name}: {len(runs) - len(failed)}/{len(runs)} runs finished" +
          (f"; not finished: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def _fit(args, path: str, overrides) -> int:
    import os

    from cascade_mega.sweep import report
    from cascade_mega.sweep.fit import fit_objectives
    from cascade_mega.sweep.results import collect
    from cascade_mega.sweep.spec import expand, load_sweep

    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0 (0: no bands), got {args.bootstrap}")
    sweep = load_sweep(path, args.root)
    runs = expand(sweep, overrides, world_size=0)
    results, failures = collect(sweep, runs)
    if not results:  # (not a warning per run first: none of them is there)
        raise ConfigError(f"sweep {sweep.name}: no finished run with a final validation loss "
                          f"in {sweep.uri}")
    for f in failures:
        print(f"cascade: warning: run {f['run']} is left out of the fit: {f['reason']}")
    laws = fit_objectives(results, bootstrap=args.bootstrap)
    for label, law in laws.items():
        if getattr(law, "warning", None):
            print(f"cascade: warning: law {label}: {law.warning}")
    paths = report.write(os.path.join(sweep.root, "fit"), results, failures, laws,
                         runs[0].cfg.data.seq_len)
    with open(paths[0]) as f:
        print(f.read())
    print("wrote " + "  ".join(paths))
    return 0


def run(args) -> int:
    items = list(args.args) + list(args.overrides)
    fit = items[0] == "fit"
    items = items[1:] if fit else items
    files = [a for a in items if "=" not in a]
    if len(files) != 1:
        raise ConfigError("give one sweep file: cascade sweep [fit] SWEEP.yaml [KEY=VALUE ...]")
    overrides = [a for a in items if "=" in a]
    return (_fit if fit else _run)(args, files[0], overrides)
