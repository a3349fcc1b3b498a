"""Small builders shared by tests."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import torch

from cascade_mega.config import load_config
from cascade_mega.model.gpt import build_model, predict_and_score

VOCAB = 40
MASK_ID = VOCAB - 1
# the tiny model the command-line and trainer tests train on the embedded corpus (each test adds
# the steps, batch and intervals it needs)
TINY_MODEL = ["model.num_layers=2", "model.hidden_size=64", "data.seq_len=64",
              "diffusion.block_size=8"]
# one step of a one-layer model, nothing evaluated or tracked: the cheapest complete run
ONE_STEP = ["model.num_layers=1", "model.hidden_size=64", "data.seq_len=32", "train.steps=1",
            "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_batches=0",
            "optimizer.warmup_steps=0", "tracking.enabled=false"]


def tiny_cfg(*overrides, run_dir="/tmp/cascade-test"):
    base = [f"run_dir={run_dir}", "model.num_layers=2", "model.hidden_size=64",
            "model.num_attention_heads=4", "data.seq_len=16", "diffusion.block_size=4",
            "train.steps=10", "optimizer.warmup_steps=1", "tracking.enabled=false"]
    return load_config(None, base + list(overrides))


def tiny_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg, VOCAB, forbidden_ids=[MASK_ID])
    model.eval()
    return model


def score(model, prep):
    """Per-token CE and hits of the read-out rows, through the real megatron model."""
    return model(prep.input_ids, prep.position_ids, prep.layout,
                 output_processor=predict_and_score, output_processor_context=prep.readout,
                 noise_levels=prep.noise_levels)


def hidden(model, input_ids, position_ids, layout):
    """Final hidden states [S, b, h] of every row."""
    return model(input_ids, position_ids, layout,
                 output_processor=lambda hidden_states, **_: hidden_states)


def exact_block_nelbo(model, block: int, context, continuation, score_entropy=False,
                      given=()) -> float:
    """E_t,mask[(1/t) sum_masked CE] of `continuation` after `context` (token lists), summed,
    by enumerating every mask pattern of the continuation's positions in every block
    (score_entropy: of CE + g(Z / a), the score-entropy term, which does not depend on t).

    Blocks are aligned from position 0; the context is clean, the rest of the last block [MASK].
    A block's term depends only on its own mask (other blocks' noisy tokens are invisible to it),
    and for a pattern with k of a block's m continuation positions masked, t ~ U(0, 1] gives the
    weight E[t^k (1-t)^(m-k) / t] = (k-1)! (m-k)! / m!."""
    import itertools
    import math

    from cascade_mega.diffusion import objective

    n = len(context) + len(continuation)
    P = -(-n // block) * block
    x0 = torch.tensor([list(context) + list(continuation) + [MASK_ID] * (P - n)])
    total = 0.0
    for blk in range(P // block):
        where = [i for i in range(blk * block, (blk + 1) * block)
                 if len(context) <= i < n and i not in given]  # given: clean, not targets
        m = len(where)
        for pattern in itertools.product([0, 1], repeat=m):
            k = sum(pattern)
            if k == 0:
                continue
            masked = torch.zeros(1, P, dtype=torch.bool)
            masked[0, [i for i, on in zip(where, pattern) if on]] = True
            xt = torch.where(masked, MASK_ID, x0)
            prep = objective.Prepared(
                torch.cat([xt, x0], 1), torch.arange(P).repeat(2)[None],
                objective.AttentionLayout("block_diffusion", P, block),
                objective.ReadOut(torch.arange(P), x0, score_entropy=score_entropy),
                masked.double(), masked, P)
            ce, _ = score(model, prep)
            weight = math.factorial(k - 1) * math.factorial(m - k) / math.factorial(m)
            total += weight * float(torch.where(masked, ce.double(), 0.0).sum())
    return total


def records(run_dir) -> list:
    """The run's `metrics.jsonl` records (none yet: [])."""
    import json

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(cfg, callbacks=()):
    """Train `cfg` in this process (its metrics file written); (trainer, its records)."""
    from cascade_mega.train.callbacks import MetricsFile
    from cascade_mega.train.trainer import Trainer

    trainer = Trainer(cfg, [MetricsFile(cfg.run_dir), *callbacks]).setup()
    trainer.fit()
    return trainer, records(cfg.run_dir)


def assert_same_records(a, b, keys=("loss", "grad_norm"), tol=1e-5):
    """The same steps and splits, and each of `keys` a record has within `tol`."""
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if key in ra or key in rb:
                assert abs(ra[key] - rb[key]) < tol, (key, ra, rb)


def random_tokens(b, L, generator=None):
    return torch.randint(0, MASK_ID, (b, L), generator=generator)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cascade(*args, env=None, process=False, background=False, timeout=600, cwd=ROOT):
    """The one way the tests run the command line: `cascade ARGS` from the repository root.

    By default in this process (the command line's own `main`, no interpreter start per call):
    its exit code and what it printed, as a finished subprocess gives them. process=True: in its
    own interpreter (`python -m cascade_mega`), for what needs one (signals, a server that must
    see the process end, the start-up itself); background=True: that process left running (a
    `Popen` with its output piped, in a session of its own). cwd: the directory it runs in (default the repository)."""
    from cascade_mega.cli import main

    if process or background:
        cmd = [sys.executable, "-m", "cascade_mega", *map(str, args)]
        full_env = {**os.environ, **(env or {})}
        if background:
            # its own session: `os.killpg(proc.pid, ...)` ends it with every process it started
            return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
        return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)

    out, err = io.StringIO(), io.StringIO()
    saved, here = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as stop:  # argparse's own errors
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def source_checkout(dest) -> str:
    """A copy of the repository's sources at `dest` (a source checkout, nothing installed from
    it): the library, kernels/, launchers/, tools/, configs/, the job templates and
    pyproject.toml (whose package-dir mapping names kernels/ and launchers/ for imports)."""
    import shutil

    for name in ("cascade_mega", "kernels", "launchers", "tools", "configs", "slurm"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dest, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(os.path.join(ROOT, "pyproject.toml"), dest)
    return str(dest)


def h100_profile(tmp_path) -> str:
    """The h100 cluster profile, its container mounts extended by this machine's paths (the
    repository, `tmp_path`), which the site's mounts do not hold: the job's paths must be inside."""
    from omegaconf import OmegaConf

    profile = OmegaConf.load(os.path.join(ROOT, "configs", "clusters", "h100.yaml"))
    profile.container_mounts = [*profile.container_mounts, f"{tmp_path}:{tmp_path}",
                                f"{ROOT}:{ROOT}"]
    path = os.path.join(tmp_path, "h100.yaml")
    OmegaConf.save(profile, path)
    return path


def run_python(*args, cwd) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh interpreter (what a user types), from `cwd`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def torchrun(nproc: int, script: str, *args, timeout=600) -> subprocess.CompletedProcess:
    """The one way the tests start several ranks of a script of their own (`cascade train
    --nproc-per-node` starts the training ranks): torchrun on this machine, gloo, one thread per
    rank (the suite's machine has 2 cores)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", script, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
