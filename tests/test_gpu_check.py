"""`tools/gpu_check.py --cpu-dry-run`: the GPU acceptance script runs here at tiny sizes.

Phases A-C at tiny sizes on the CPU, in a subprocess (as on the GPU host: a fresh interpreter,
the script's own start-up); each phase's JSON file is written and says ok, and MLflow is never
imported (the GPU host has no MLflow).
"""

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"),
                           "--cpu-dry-run", "--phases", "A,B,C", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CASCADE_DATA_HOME": os.environ.get(
                              "CASCADE_DATA_HOME", os.path.join(ROOT, ".cache", "data"))})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase in "ABC":
        result = json.loads((out / f"gpu_check_{phase}.json").read_text())
        assert result["ok"] and not result["mlflow_imported"], (phase, result)
    a = json.loads((out / "gpu_check_A.json").read_text())
    kinds = {(c["kernel"], c["dtype"], c["documents"]) for c in a["cases"]}
    assert {("flex", "bfloat16", True), ("tiled", "float32", False),
            ("tiled_cp", "bfloat16", False)} <= kinds
    b = json.loads((out / "gpu_check_B.json").read_text())
    assert {"time_ratio", "memory_ratio", "bd_tflops", "ar_tflops"} <= set(b)
    c = json.loads((out / "gpu_check_C.json").read_text())
    assert c["bd_loss_last10"] < c["bd_loss_first10"] and c["bd_decode_tokens_per_s"] > 0
