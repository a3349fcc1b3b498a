"""Two gloo processes under torchrun (data parallel) give the single-process losses."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["train", "configs/quickstart.yaml", "model.num_layers=2", "model.hidden_size=64",
        "data.seq_len=64", "diffusion.block_size=8", "train.micro_batch_size=2",
        "train.global_batch_size=4", "optimizer.warmup_steps=2", "train.steps=4",
        "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1",
        "tracking.enabled=false"]


def _records(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_data_parallel_two_processes_match_single_process(tmp_path):
    single = subprocess.run([sys.executable, "-m", "cascade_mega", *ARGS,
                             f"run_dir={tmp_path}/single"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    double = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "cascade_mega", *ARGS,
                             f"run_dir={tmp_path}/dp2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert double.returncode == 0, double.stderr
    a, b = _records(tmp_path / "single"), _records(tmp_path / "dp2")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5, (ra, rb)
        if ra["split"] == "train":
            assert abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-5, (ra, rb)
