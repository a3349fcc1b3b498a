"""`cascade`: the one console command. Subcommands stay thin; the work lives in the library.

Errors a user can fix (config, data, checkpoint, device, a busy run directory, a decoding
request: every `errors.UserError`, and a missing file) print one `cascade: error: ...` line and
exit 2, before any model is built.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


class Parser(argparse.ArgumentParser):
    """argparse, its errors in the project's one-line form (the usage is one --help away)."""

    def error(self, message):
        print(f"cascade: error: {self.prog}: {message} (see '{self.prog} --help')",
              file=sys.stderr)
        sys.exit(2)


_QUIETED = False


def _quiet():
    # megatron-core warns about every optional dependency it does not find; on CPU that is noise.
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # MLflow 3 reports usage to its vendor unless told not to; runs here stay private
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    # its checkpoint writer logs each worker's failure, which also reaches the save as its
    # exception: the save names the cause once (a full disk: `checkpoint/space.py`)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(
        logging.CRITICAL)
    # torch's checkpoint loader warns on the root logger, with a traceback, whenever it falls
    # back (to per-rank metadata these checkpoints never have); a load that fails still raises,
    # with its reason, which the command prints as its one message
    global _QUIETED
    if not _QUIETED:  # once per process (the tests call `main` many times)
        _QUIETED = True
        logging.getLogger().addFilter(
            lambda record: "torch/distributed/checkpoint/" not in
            record.pathname.replace("\\", "/"))


def _train(args) -> int:
    from cascade_mega.train.run import command

    return command(args.config, args.overrides, args.nproc_per_node, args.nnodes,
                   args.rdzv_endpoint)


# integer options of the benchmarks that may be 0 or negative; every other count must be >= 1
_BENCH_ANY_INT = ("seed", "top_k", "nproc_per_node")


def _bench(args) -> int:
    from cascade_mega.config import ConfigError

    for name, value in sorted(vars(args).items()):
        if type(value) is int and name not in _BENCH_ANY_INT and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    args.bench_run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cascade", description="block-diffusion LM pretraining")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config plus dotted overrides")
    t.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. model.num_layers=4")
    t.add_argument("--nproc-per-node", type=int, default=0,
                   help="start this many ranks on this node (torchrun is run for you)")
    t.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node run")
    t.add_argument("--rdzv-endpoint", default="127.0.0.1:29500",
                   help="host:port of the rendezvous, for --nnodes > 1")
    t.set_defaults(func=_train)
    from cascade_mega import plan
    from cascade_mega.data import preprocess
    from cascade_mega.inference import command as generate
    from cascade_mega.slurm import jobs, submit
    from cascade_mega.sweep import command as sweep
    from cascade_mega.convert import command as convert
    from cascade_mega.evaluation import command as evaluate
    from cascade_mega.tracking import runs

    for name, module, text in (
            ("preprocess", preprocess, "text / JSONL / wiki dumps to indexed datasets"),
            ("generate", generate, "generate text from a run or checkpoint"),
            ("submit", submit, "submit training runs, arrays or chains to Slurm"),
            ("jobs", jobs, "state, restarts, checkpoint and logs of submitted runs"),
            ("runs", runs, "tracked runs and their final metrics, from MLflow"),
            ("sweep", sweep, "run a sweep grid (local or a Slurm array); `sweep fit`: scaling laws"),
            ("convert", convert, "Hugging Face <-> megatron checkpoints, runs at another layout"),
            ("eval", evaluate, "lm-evaluation-harness tasks on runs, side by side"),
            ("plan", plan, "memory per GPU of a parallel layout, before launching it")):
        sp = sub.add_parser(name, help=text)
        module.add_arguments(sp)
        sp.set_defaults(func=module.run)
    b = sub.add_parser("bench", help="benchmarks printed as ratios against a baseline")
    bsub = b.add_subparsers(dest="what", required=True)  # (noise: a variance, not a speed)
    from cascade_mega.bench import attention as bench_attention
    from cascade_mega.bench import continued as bench_continued
    from cascade_mega.bench import data as bench_data
    from cascade_mega.bench import generate as bench_generate
    from cascade_mega.bench import noise as bench_noise
    from cascade_mega.bench import train as bench_train

    for name, module, text in (("train", bench_train, "block diffusion vs AR training step"),
                               ("attention", bench_attention, "attention kernels vs AR"),
                               ("generate", bench_generate, "block decoding vs AR decoding"),
                               ("data", bench_data, "input pipeline vs training tokens/s"),
                               ("noise", bench_noise,
                                "variance of the loss estimate under each t floor"),
                               ("continued", bench_continued,
                                "continued pretraining from an AR model vs scratch")):
        sp = bsub.add_parser(name, help=text)
        module.add_arguments(sp)
        sp.set_defaults(bench_run=module.run)
    b.set_defaults(func=_bench)
    return p


def main(argv=None) -> int:
    _quiet()
    parser = build_parser()
    # overrides may come after options (`train CFG --nproc-per-node 2 model.x=1`): collect them
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-")
                                                         for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    args.command_parser = parser  # commands that check a cascade command line (chain stages)
    from cascade_mega.config import redact_uri
    from cascade_mega.errors import RunStopped, UserError

    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as err:  # a path that is not there: the stdlib's own
        _ended_on_error()
        print(f"cascade: error: {redact_uri(str(err))}", file=sys.stderr)
        return 2
    except RunStopped as err:  # a run that stopped itself, with its reason
        _ended_on_error()
        print(f"cascade: error: {redact_uri(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without a checkpoint
        _ended_on_error()
        print("cascade: interrupted", file=sys.stderr)
        return 130


def _ended_on_error() -> None:
    """A failed command leaves any process group it started to the interpreter's teardown
    (`runtime/distributed.py`: groups are destroyed at exit only after a success)."""
    distributed = sys.modules.get("cascade_mega.runtime.distributed")
    if distributed is not None:  # not imported: no group was started
        distributed.ended_on_error()


if __name__ == "__main__":
    sys.exit(main())
