"""Bad input: one clear message naming the problem, a non-zero exit, nothing written.

The table (`bad_input_cases.py`, one case per command line, every command) is checked the same
way for each case; the cases below it need more than a command line (a crafted checkpoint, a
Transformer Engine that fails to import, a machine without the GPU a job expects).
"""

import json
import os

import pytest
import torch

from bad_input_cases import CASES, build_inputs
from helpers import ONE_STEP, ROOT, cascade, h100_profile


def one_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cascade: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _tree(*roots) -> dict:
    """Every file under `roots`, with its size and modification time."""
    out = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                st = os.stat(path)
                out[path] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory):
    inp = tmp_path_factory.mktemp("inputs")
    build_inputs(str(inp), str(tiny_run))
    return inp


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_bad_input_table(case, inputs, tiny_run, tmp_path):
    name, args, needle, *env = case
    fill = {"{tmp}": str(tmp_path), "{inp}": str(inputs), "{run}": str(tiny_run),
            "{profile}": os.path.join(str(inputs), "h100.yaml")}

    def filled(text):
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    argv = [filled(a) for a in args]
    if argv[0] == "train" and not any(a.startswith("run_dir=") for a in argv):
        argv.append(f"run_dir={tmp_path}/run")
    before = _tree(inputs, tiny_run, os.path.join(ROOT, "runs"))
    proc = cascade(*argv, env={k: filled(v) for k, v in env[0].items()} if env else None)
    one_error(proc, filled(needle))
    if argv[0] != "train":  # (train names its run directory first, then checks)
        assert proc.stdout == "", proc.stdout  # nothing echoed before the message
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    assert _tree(inputs, tiny_run, os.path.join(ROOT, "runs")) == before


def test_a_budget_past_the_context_is_said_before_decoding(tiny_run):
    """A prompt whose new tokens would run past the context: one warning per prompt, before the
    decoding, which then stops at the context."""
    proc = cascade("generate", "--ckpt", tiny_run, "--prompt", "ROMEO: what light", "--json",
                   "--max-new-tokens", "64", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("cascade: warning")]
    assert len(warnings) == 1 and "the context (32) leaves room for at most" in warnings[0]
    room = int(warnings[0].split("at most ")[1].split()[0])
    assert len(json.loads(proc.stdout.splitlines()[0])["tokens"]) <= room


def test_preprocess_says_how_much_text_was_not_utf8(tmp_path):
    text = tmp_path / "in.txt"
    text.write_bytes(b"good text \xff\xfe and more\n")
    proc = cascade("preprocess", text, "--output-prefix", tmp_path / "ds", "--train-bpe", "300")
    assert proc.returncode == 0, proc.stderr
    assert "warning: 2 bytes of the inputs are not UTF-8 text" in proc.stderr


def test_gpu_only_checks_run_where_the_job_runs(tmp_path):
    """The FP8 recipe is submitted, planned and swept from a host without a GPU or Transformer
    Engine: those are checked on the nodes (`runtime/machine.py`), which must have a GPU."""
    fp8 = "configs/recipes/qwen2.5_7b_h100_fp8.yaml"
    proc = cascade("submit", fp8, "--cluster", h100_profile(tmp_path), "--nodes", "8",
                   "--dry-run", f"run_dir={tmp_path}/fp8")
    assert proc.returncode == 0, proc.stderr
    assert "export CASCADE_EXPECT_GPU=1" in proc.stdout and "--gpus-per-node=8" in proc.stdout
    plan = cascade("plan", fp8, "--gpus", "64")
    assert plan.returncode == 0 and "total" in plan.stdout, plan.stderr
    one_error(cascade("train", "configs/base.yaml", "train.fp8=hybrid",
                      "train.fp8_bf16_first_layers=1", f"run_dir={tmp_path}/x"),
              "train.fp8_bf16_first_layers", "tensorwise")


def test_a_gpu_job_rank_without_a_gpu_stops_with_one_message(tmp_path):
    from cascade_mega.runtime import device

    saved = device.current()
    device.use(None)
    try:
        one_error(cascade("train", "configs/base.yaml", f"run_dir={tmp_path}",
                          env={"CASCADE_EXPECT_GPU": "1"}), "sees no CUDA device",
                  "GPU cluster profile")
    finally:
        device.use(saved)


def test_a_broken_transformer_engine_is_named(tmp_path, monkeypatch, capsys):
    """An installed Transformer Engine that fails to import (stand-in: a package raising OSError
    as a wrong CUDA build does; CUDA reported present) is named, not silently skipped."""
    import sys

    import torch

    from cascade_mega.runtime import te_support

    pkg = tmp_path / "transformer_engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pytorch.py").write_text("raise OSError('libtransformer_engine.so: undefined symbol')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    te_support._probe.cache_clear()
    try:
        assert not te_support.available()
        assert "undefined symbol" in te_support.import_error()
        with pytest.raises(RuntimeError, match="installed but does not import.*undefined symbol"):
            te_support.require("train.fp8")
        assert te_support.use_for_auto() is False
        assert "falls back to the local spec" in capsys.readouterr().err
    finally:
        te_support._probe.cache_clear()
        sys.modules.pop("transformer_engine", None)
        sys.modules.pop("transformer_engine.pytorch", None)


TINY_RUN = ["configs/base.yaml", *ONE_STEP]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    proc = cascade("train", *TINY_RUN, f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr
    return run


class _Creates:
    """Unpickling it creates a file: what a crafted checkpoint would do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _crafted(tiny_run, tmp_path, where):
    """A copy of the run whose checkpoint carries the payload as its `.metadata`, or as the
    shard's common-state item (appended to `__0_0.distcp`, the metadata pointing at it). Its
    manifest is rewritten to match, as whoever crafts a checkpoint can: the checksums find
    damage, the unpickler's allow-list stops code."""
    import dataclasses
    import io
    import pickle
    import shutil

    from cascade_mega.checkpoint import manifest

    run, marker = tmp_path / where, tmp_path / f"{where}.created"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints" / "iter_0000001"
    if where == "metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(_Creates(marker)))
        manifest.write(str(ckpt))
        return run, marker
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: trusted here
    payload = io.BytesIO()
    torch.save(_Creates(marker), payload)
    shard = ckpt / "__0_0.distcp"
    [index] = [i for i in metadata.storage_data if i.fqn.startswith("common_state")]
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], relative_path=shard.name, offset=shard.stat().st_size,
        length=len(payload.getvalue()))
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    manifest.write(str(ckpt))
    return run, marker


@pytest.mark.parametrize("where", ["metadata", "shard"])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_loader(tiny_run, tmp_path, where):
    """torch's checkpoint reader unpickles `.metadata` and a shard's non-tensor items without
    restriction; here each loading command refuses the payload, which never runs."""
    import shutil

    run, marker = _crafted(tiny_run, tmp_path, where)
    teacher = tmp_path / "teacher"  # the same checkpoint, its config saying AR (a teacher's)
    shutil.copytree(run, teacher)
    config = teacher / "config.yaml"
    config.write_text(config.read_text().replace("objective: block_diffusion", "objective: ar"))
    loaders = {
        "generate": ("generate", "--ckpt", run, "--prompt", "ROMEO:", "--max-new-tokens", "2"),
        "convert": ("convert", "mcore-to-hf", run, tmp_path / "hf"),
        "eval": ("eval", run, "--tasks", "shakespeare_cloze", "--limit", "1"),
        "resume": ("train", *TINY_RUN, f"run_dir={run}", "train.steps=2"),
        "init_from": ("train", *TINY_RUN, f"run_dir={tmp_path}/fresh", f"train.init_from={run}"),
        "teacher": ("train", *TINY_RUN, f"run_dir={tmp_path}/student",
                    f"distill.teacher={teacher}"),
    }
    for name, args in loaders.items():
        one_error(cascade(*args), "refusing checkpoint", "which a checkpoint never holds")
        assert not marker.exists(), name


