"""`cascade train` end to end on a tiny model, and the benchmarks' `--json` reports."""

import json
import re

import pytest

from helpers import TINY_MODEL, cascade
TINY = [*TINY_MODEL, "train.micro_batch_size=4", "train.global_batch_size=4",
        "optimizer.warmup_steps=2"]


def run(*args):
    """The command line in this process (`helpers.cascade`); the first test below starts it as
    its own process, as users do."""
    return cascade(*args)


SUMMARY = re.compile(r"\[(\d+) prompt\(s\) (?:in one batch|one after the other): (\d+) tokens, "
                     r"(\d+) forwards \(([\d.]+) tokens/forward\), ([\d.]+) tokens/s, policy \S+\]")


def summary(proc):
    """`cascade generate`'s closing line on stderr: prompts, tokens, forwards, its figures
    consistent (tokens/forward as the two counts give it)."""
    m = SUMMARY.search(proc.stderr)
    assert m, proc.stderr
    prompts, tokens, forwards = int(m[1]), int(m[2]), int(m[3])
    assert m[4] == f"{tokens / max(forwards, 1):.2f}" and (float(m[5]) > 0) == (tokens > 0), m[0]
    return prompts, tokens, forwards


def generations(proc, max_new: int) -> list:
    """`cascade generate --json`'s objects, one per prompt, each of exactly `max_new` tokens
    unless it stopped at end-of-text (whose token, and anything its block decided after it, is
    not output); the summary counts their tokens."""
    assert proc.returncode == 0, proc.stderr
    outs = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    for out in outs:
        decided = sum(b["tokens"] for b in out["blocks"])
        if out["stopped"] == "length":
            assert len(out["tokens"]) == decided == max_new, out
        else:
            assert out["stopped"] == "eod" and len(out["tokens"]) < decided <= max_new, out
    prompts, tokens, _ = summary(proc)
    assert (prompts, tokens) == (len(outs), sum(len(o["tokens"]) for o in outs))
    return outs


def test_train_writes_run_directory_and_its_mlflow_store_opens_in_the_ui(tmp_path):
    """The CPU mixture-of-experts recipe (configs/recipes/moe_tiny_cpu.yaml), smaller and
    shorter: the run directory, its validation bound below a tenth of step 0's, the load of
    every expert in metrics.jsonl and the default MLflow store, the store in `mlflow ui`, and
    `cascade generate` decoding the run through its expert layers and KV cache."""
    run_dir = tmp_path / "run"
    proc = cascade("train", "configs/recipes/moe_tiny_cpu.yaml", "model.hidden_size=128",
                   "data.seq_len=64", "train.steps=60", "train.eval_interval=30",
                   "train.eval_batches=2", "checkpoint.interval=30", "tracking.samples=0",
                   f"run_dir={run_dir}", process=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"run_dir: {run_dir}"
    assert sum(line.startswith("step ") for line in lines) == 6
    assert "| experts EP 1 x expert-TP 1" in lines[1]
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [0, 30, 60]
    assert valid[-1]["ppl_bound"] < valid[0]["ppl_bound"] / 10, valid
    last = [r for r in records if r["split"] == "train"][-1]
    loads = [last[f"expert_load/{e}"] for e in range(8)]
    assert abs(sum(loads) - 8) < 1e-6 and last["moe/load_max"] >= max(loads)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000060"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [10, 20, 30, 40, 50, 60]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.data.params["model.moe.num_experts"] == "8"
    assert all(f"expert_load/{e}" in mlflow_run.data.metrics for e in range(8))
    assert mlflow_run.info.status == "FINISHED"
    # the default store opens in `mlflow ui` (a real one, on a loopback port)
    from mlflow_server import MlflowServer

    ui = MlflowServer(tmp_path / "ui", command="ui",
                      backend=f"sqlite:///{run_dir}/mlflow.db").start()
    try:
        shown = MlflowClient(ui.uri)
        exp = shown.get_experiment_by_name("cascade")
        assert [r.info.run_id for r in shown.search_runs([exp.experiment_id])] == [run_id]
        assert shown.get_run(run_id).data.metrics["loss"] == history[-1].value
    finally:
        ui.stop()
    out = run("generate", "--ckpt", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "16")
    assert out.returncode == 0, out.stderr
    again = run("generate", "--ckpt", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "16",
                "--json")
    [gen] = generations(again, 16)
    # greedy: the same tokens streamed after the prompt as the JSON's; one prompt: each forward
    # is one step of its block
    assert out.stdout == "ROMEO:" + gen["text"] + "\n"
    assert summary(out) == summary(again) == (1, len(gen["tokens"]),
                                              sum(b["steps"] for b in gen["blocks"]))


def test_bench_train_json(tmp_path):
    """On an MoE model: both objectives through the same 4 experts (top 2); two ranks against
    one process (parallel_time_ratio); the next-token loss on a causal clean stream (2L rows)
    against an extra causal stream (3L rows)."""
    proc = run("bench", "train", *TINY, "model.moe.num_experts=4", "model.moe.ffn_hidden_size=64",
               "--steps", "2", "--nproc-per-node", "2", "--clean-stream", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "experts=4 top_k=2" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["experts"] == 4 and result["top_k"] == 2
    # Times are for the benchmark to report, not for a test to judge (only that its ratios are
    # of the times it reports); memory is deterministic.
    assert result["bd_step_s"] > 0 and result["ar_step_s"] > 0 and result["dense_step_s"] > 0
    assert result["time_ratio"] == result["bd_step_s"] / result["ar_step_s"]
    assert result["memory_ratio"] > 1.0  # the 2L layout holds more activations than L
    assert result["memory_ratio"] == pytest.approx(result["bd_peak_mb"] / result["ar_peak_mb"])
    assert result["seq_len"] == 64 and result["block_size"] == 8
    assert result["dense_time_ratio"] == result["dense_step_s"] / result["ar_step_s"]
    assert result["dense_memory_ratio"] == pytest.approx(
        result["dense_peak_mb"] / result["ar_peak_mb"])
    # tracking on vs off, as a fraction of the untracked step (noise may make it negative)
    assert result["tracking_overhead"] == pytest.approx(
        result["tracked_step_s"] / result["untracked_step_s"] - 1)
    assert result["clean_stream_time_ratio"] == \
        result["causal_clean_step_s"] / result["extra_stream_step_s"]
    assert result["clean_stream_memory_ratio"] < 0.9  # two streams' activations, not three
    assert result["parallel_step_s"] > 0 and result["single_step_s"] > 0
    assert result["parallel_time_ratio"] == result["parallel_step_s"] / result["single_step_s"]


def test_bench_attention_json():
    proc = run("bench", "attention", "--seq-len", "64", "--block-size", "8", "--batch", "1",
               "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(result[f"{k}_s"] > 0 for k in ("ar", "tiled", "dense", "shared_3L", "two_2L"))
    assert result["time_ratio"] == result["tiled_s"] / result["ar_s"]
    assert result["dense_time_ratio"] == result["dense_s"] / result["ar_s"]
    assert result["shared_stream_time_ratio"] == result["shared_3L_s"] / result["two_2L_s"]
    assert result["memory_ratio"] > 0 and result["dense_memory_ratio"] > 0


def test_bench_generate_json(tmp_path):
    runs = {}
    for name, objective in (("bd", "block_diffusion"), ("ar", "ar")):
        runs[name] = tmp_path / name
        causal = ["diffusion.clean_stream=causal", "diffusion.ar_loss_weight=1.0"] \
            if name == "bd" else []  # its causal stream: the causal and speculative rows
        proc = run("train", "configs/base.yaml", *TINY, "train.steps=2",
                   "train.eval_batches=0", "optimizer.warmup_steps=1",
                   f"diffusion.objective={objective}", f"run_dir={runs[name]}", *causal)
        assert proc.returncode == 0, proc.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n")
    proc = run("bench", "generate", "--bd", str(runs["bd"]), "--ar", str(runs["ar"]),
               "--prompts-file", str(prompts), "--max-new-tokens", "12", "--samples", "2",
               "--judge", str(runs["ar"]), "--policies",
               "fixed,fixed:random@2,adaptive+remask,causal,speculative#1/fixed@1",
               "--repeats", "1", "--batch", "1,3", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["samples"] == 4 and report["dtype"] == "float32"  # 2 prompts x 2 seeds
    names = ["ar", "fixed", "fixed:random@2", "adaptive+remask", "causal",
             "speculative#1/fixed@1"]
    assert [r["policy"] for r in report["rows"]] == names
    quality = {"gen_ppl", "entropy", "sample_entropy", "rep_2", "rep_3", "rep_4", "repetition",
               "gen_ppl_vs_ar", "entropy_vs_ar", "repetition_vs_ar"}
    for row in report["rows"]:
        assert set(row) == quality | {"policy", "tokens_per_s", "forwards_per_token",
                                      "tokens_per_forward", "speedup_vs_ar", "speedup_vs_causal"} | (
            {"acceptance_by_position"} if row["policy"].startswith("speculative") else set())
        assert row["speedup_vs_causal"] == row["tokens_per_s"] / report["rows"][4]["tokens_per_s"]
        assert row["tokens_per_s"] > 0 and row["gen_ppl"] > 1 and 0 <= row["entropy"] <= 14
        assert row["speedup_vs_ar"] == row["tokens_per_s"] / report["rows"][0]["tokens_per_s"]
        assert 0 <= row["repetition"] < 1 and row["sample_entropy"] <= row["entropy"] + 1e-9
    assert set(report["data"]) == quality | {"policy"} and report["data"]["gen_ppl"] > 1
    ar_row = report["rows"][0]
    assert ar_row["speedup_vs_ar"] == 1.0 and ar_row["forwards_per_token"] >= 1.0
    assert ar_row["entropy_vs_ar"] == 1.0
    # fixed: 3 forwards per block of 8 (the first block holds the prompt's tail too)
    assert report["rows"][1]["forwards_per_token"] < 0.85 < ar_row["forwards_per_token"]
    assert report["rows"][2]["forwards_per_token"] < report["rows"][1]["forwards_per_token"]
    accepted = report["rows"][5]["acceptance_by_position"]  # per position of the block of 8
    assert len(accepted) == 8 and any(a is not None for a in accepted) and \
        all(a is None or 0 <= a <= 1 for a in accepted)
    assert [(r["policy"], r["batch"]) for r in report["batched"]] == \
        [(n, b) for b in (1, 3) for n in names]
    ar_at = {r["batch"]: r["tokens_per_s"] for r in report["batched"] if r["policy"] == "ar"}
    assert all(r["tokens_per_s"] > 0 and r["speedup_vs_ar"] == r["tokens_per_s"] /
               ar_at[r["batch"]] for r in report["batched"])
    wrong = run("bench", "generate", "--bd", str(runs["bd"]), "--policies", "threshold:random")
    assert wrong.returncode != 0 and "'threshold:random'" in wrong.stderr
    half = run("bench", "generate", "--bd", str(runs["bd"]), "--ar", str(runs["ar"]),
               "--prompts-file", str(prompts), "--max-new-tokens", "12", "--samples", "1",
               "--policies", "adaptive", "--repeats", "1", "--precision", "bf16", "--json")
    assert half.returncode == 0, half.stderr
    report = json.loads(half.stdout.strip().splitlines()[-1])
    assert report["dtype"] == "bfloat16" and all(1 < r["gen_ppl"] < 1e6 for r in report["rows"])
    gen = ("generate", "--ckpt", str(runs["bd"]), "--max-new-tokens", "8", "--precision", "bf16",
           "--json")
    [out] = generations(run(*gen, "--prompt", "ROMEO:"), 8)
    assert generations(run(*gen, "--prompt", "ROMEO:"), 8) == [out]  # greedy: the same again
    both = generations(run(*gen, "--prompts-file", str(prompts)), 8)  # one batch of two
    assert both[0]["prompt"] == out["prompt"] != both[1]["prompt"]  # in the file's order
    bad = run("bench", "generate", "--bd", str(runs["bd"]), "--ar", str(runs["ar"]),
              "--judge", str(runs["bd"]), "--prompts-file", str(prompts))
    assert bad.returncode != 0 and "--judge" in bad.stderr and "not an AR checkpoint" in bad.stderr
    none = run("bench", "generate", "--bd", str(runs["bd"]), "--samples", "0")
    assert none.returncode != 0 and "--samples must be >= 1" in none.stderr
    # `bench noise` on the same run: the loss estimate's spread per t floor, the unfloored first
    noise = run("bench", "noise", str(runs["bd"]), "--floors", "1e-3,0.05", "--draws", "6",
                "--batch", "2", "--json")
    assert noise.returncode == 0, noise.stderr
    report = json.loads(noise.stdout.strip().splitlines()[-1])
    assert list(report["floors"]) == ["0.0", "0.001", "0.05"]
    assert report["std_ratio"]["0.0"] == 1.0 and report["bias"]["0.0"] == 0.0
    assert report["floors"]["0.05"]["max_weight"] <= 1 / 0.05  # no weight above 1 / floor
    ar = run("bench", "noise", str(runs["ar"]))
    assert ar.returncode == 2 and "AR run" in ar.stderr


def test_bench_data_json():
    proc = run("bench", "data", *TINY, "--batches", "20", "--steps", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"loader_tokens_per_s", "train_tokens_per_s", "headroom", "backend",
                           "dali_tokens_per_s", "dali_headroom"}  # the test venv has DALI
    assert report["headroom"] == report["loader_tokens_per_s"] / report["train_tokens_per_s"]
    assert report["dali_headroom"] == report["dali_tokens_per_s"] / report["train_tokens_per_s"]
