"""`cascade sweep`: the scaling-law fit on data drawn from known laws, a real sweep run by the local
executor (stop, resume, skip, a failed run named and left out of the fit), and bad sweep files
refused before anything runs. The Slurm executor's job array is tested in test_slurm.py."""

import json

import numpy as np
import pytest

from cascade_mega.sweep.fit import NAMES, fit_law, fit_objectives, multiplier
from helpers import ROOT, cascade

TRUE = dict(E=1.8, A=400.0, alpha=0.34, B=410.0, beta=0.28)  # Chinchilla's fit, roughly


def draw(law, seed, noise=0.005, n=(1e5, 1e8), d=(1e7, 1e10)):
    """A 5 x 5 grid of (N, D) with losses from `law` times log-normal noise."""
    rng = np.random.default_rng(seed)
    N, D = np.meshgrid(np.logspace(*np.log10(n), 5), np.logspace(*np.log10(d), 5))
    N, D = N.ravel(), D.ravel()
    L = law["E"] + law["A"] / N ** law["alpha"] + law["B"] / D ** law["beta"]
    return N, D, L * np.exp(rng.normal(0.0, noise, L.shape))


@pytest.mark.parametrize("seed", [1, 2])
def test_fit_recovers_a_known_law_within_its_intervals(seed):
    N, D, L = draw(TRUE, seed)
    law = fit_law(N, D, L, C=6 * N * D, bootstrap=100, seed=seed)
    for name in NAMES:
        low, high = law.ci[name]
        assert low <= TRUE[name] <= high, (name, TRUE[name], law.ci[name])
        assert high - low < 0.5 * TRUE[name], (name, law.ci[name])  # informative, not vacuous
    assert law.k1 == pytest.approx(6.0) and law.k0 == pytest.approx(0.0, abs=1e-3)


def test_robust_fit_shrugs_off_one_bad_run():
    N, D, L = draw(TRUE, 3)
    L[7] *= 1.5  # a diverged run
    law = fit_law(N, D, L, bootstrap=0)
    assert law.alpha == pytest.approx(TRUE["alpha"], rel=0.05)
    assert law.beta == pytest.approx(TRUE["beta"], rel=0.05)
    assert law.E == pytest.approx(TRUE["E"], rel=0.05)


def test_compute_multiplier_of_an_objective_that_costs_twice_per_token():
    """Same losses, twice the FLOPs per token: matching AR's loss costs exactly 2x; a law whose
    irreducible loss lies above AR's frontier never matches it."""
    N, D, L = draw(TRUE, 4, noise=0.002)
    ar = fit_law(N, D, L, C=6 * N * D, bootstrap=20)
    twice = fit_law(N, D, L, C=12 * N * D, bootstrap=20)
    value, (low, high) = multiplier(twice, ar, 1e20)
    assert value == pytest.approx(2.0, rel=0.02) and low - 1e-6 <= 2.0 <= high + 1e-6
    worse = fit_law(N, D, L + 1.0, C=6 * N * D, bootstrap=0)
    assert multiplier(worse, ar, 1e20)[0] == float("inf")
    loss, n_opt, d_opt = ar.frontier(1e20)
    assert 6 * n_opt[0] * d_opt[0] == pytest.approx(1e20)  # the optimum spends the budget


def test_fit_per_objective_with_too_few_runs_says_why():
    N, D, L = draw(TRUE, 5)
    rows = [{"label": "ar", "params": n, "tokens": d, "loss": v, "flops": 6 * n * d}
            for n, d, v in zip(N, D, L)]
    rows += [{"label": "bd4", "params": 1e6, "tokens": 1e9, "loss": 2.5, "flops": 6e15}]
    laws = fit_objectives(rows, bootstrap=10)
    assert laws["ar"].points == 25
    assert "a fit needs at least 5 runs, 2 sizes and 2 budgets" in laws["bd4"]


def test_report_fits_the_finished_runs_and_names_the_failed_one(tmp_path):
    """25 runs drawn from a law finished, one failed: the law is fitted from the 25 and the
    failure is listed with its reason, in the Markdown and the CSV."""
    from cascade_mega.sweep import report

    N, D, L = draw(TRUE, 6)
    results = [{"run": f"ar_{i}", "label": "ar", "params": n, "tokens": d, "loss": v,
                "flops": 6 * n * d, "block_size": None, "depth": 2, "width": 64, "lr": 1e-3}
               for i, (n, d, v) in enumerate(zip(N, D, L))]
    failures = [{"run": "ar_broken", "label": "ar", "reason": "MLflow status FAILED"}]
    laws = fit_objectives(results, bootstrap=10)
    paths = report.write(str(tmp_path), results, failures, laws, 128)
    md = (tmp_path / "fit.md").read_text()
    assert "25 finished runs, 1 failed" in md and "| ar | 25 | " in md
    assert "| ar_broken | MLflow status FAILED |" in md
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert len(rows) == 27 and rows[-1] == "ar_broken,ar,,,,,,,,,failed,MLflow status FAILED"
    assert laws["ar"].alpha == pytest.approx(TRUE["alpha"], rel=0.05)
    assert str(tmp_path / "loss_vs_compute.png") in paths
    assert "Warning" not in md and laws["ar"].warning is None  # 25 runs for 5 parameters
    # the frontier's bootstrap band holds the frontier and widens past the runs' compute
    grid = np.array([1e14, 1e22])
    low, high = laws["ar"].frontier_band(grid)
    mid = laws["ar"].frontier(grid)[0]
    assert (low <= mid).all() and (mid <= high).all() and (high - low)[1] > (high - low)[0]
    # six runs for five parameters: named in the report
    few = fit_objectives(results[::4][:6], bootstrap=10)
    report.write(str(tmp_path / "few"), results[::4][:6], [], few, 128)
    assert "Warning: ar: 6 runs for the law's 5 parameters: barely determined" in \
        (tmp_path / "few" / "fit.md").read_text()


def sweep_file(tmp_path, grids, extra="", name="tiny"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""name: {name}
base: {ROOT}/configs/base.yaml
root: {tmp_path}/{name}
head_dim: 32
overrides: [data.seq_len=32, train.micro_batch_size=2, train.global_batch_size=2,
            train.eval_interval=1000, train.eval_batches=2, train.log_interval=1,
            tracking.samples=0, checkpoint.interval=1000]
{extra}grids:
{grids}""")
    return str(path)



def test_local_sweep_stops_resumes_skips_and_names_its_failed_run(tmp_path):
    """Three runs (AR, B = 4, B = L at one size and budget). The full-diffusion run's directory
    holds a checkpoint pointer to nothing, so it fails each time with the trainer's error; the
    sweep goes on. A first pass stops the others half-way (train.exit_interval), the second
    resumes and finishes them; then only the failed one is left to run. The fit names it."""
    path = sweep_file(tmp_path, "  - size: [[1, 32]]\n    tokens: [384]\n"
                                "    objective: [ar, block_diffusion]\n    block_size: [4, L]\n")
    root = tmp_path / "tiny"
    (root / "mdlm_n1x32_d384" / "checkpoints").mkdir(parents=True)
    (root / "mdlm_n1x32_d384" / "checkpoints" / "latest").write_text("iter_0000003\n")
    first = cascade("sweep", path, "train.exit_interval=3")
    assert first.returncode == 1, first.stderr
    assert "0/3 runs finished" in first.stdout, first.stdout
    assert "mdlm_n1x32_d384 starts" in first.stdout and "failed (exit 2)" in first.stdout
    for run in ("ar_n1x32_d384", "bd4_n1x32_d384"):
        assert json.loads((root / run / "exit.json").read_text())["outcome"] == "stopped"
    second = cascade("sweep", path)
    assert "ar_n1x32_d384 resumes" in second.stdout and "bd4_n1x32_d384 resumes" in second.stdout
    assert "2/3 runs finished; not finished: mdlm_n1x32_d384" in second.stdout, second.stdout
    steps = [json.loads(line)["step"] for line in
             (root / "ar_n1x32_d384" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 3, not restarted
    third = cascade("sweep", path, "--dry-run").stdout  # what a third pass would do
    states = {line.split()[0]: line.split()[-1] for line in third.splitlines()[1:4]}
    assert states == {"ar_n1x32_d384": "finished", "bd4_n1x32_d384": "finished",
                      "mdlm_n1x32_d384": "failed"}, third  # finished runs are skipped
    fit = cascade("sweep", "fit", path, "--bootstrap", "5")
    assert fit.returncode == 0, fit.stderr
    ckpts = f"{root}/mdlm_n1x32_d384/checkpoints"
    reason = (f"not in the tracking store; cascade: error: {ckpts}/latest names iter_0000003, "
              f"which is not a complete checkpoint, and no other checkpoint under {ckpts} "
              "verifies; train.resume=none starts the run over from step 0")
    assert f"run mdlm_n1x32_d384 is left out of the fit: {reason}" in fit.stdout
    report = (root / "fit" / "fit.md").read_text()
    assert f"| mdlm_n1x32_d384 | {reason} |" in report
    assert "| 1 x 32 | 384 | 1 | ar |" in report and "| 1 x 32 | 384 | 4 | bd4 |" in report
    for name in ("laws.csv", "runs.csv", "loss_vs_compute.png", "loss_vs_block_size.png"):
        assert (root / "fit" / name).stat().st_size > 0
    # the runs are grouped in MLflow under the sweep's parent run
    from mlflow.tracking import MlflowClient

    parent = json.loads((root / "sweep.json").read_text())["parent_run_id"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`cascade.group` = 'tiny'")
    children = {r.info.run_name: r for r in runs if r.info.run_id != parent}
    assert set(children) >= {"ar_n1x32_d384", "bd4_n1x32_d384"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in children.values())
    assert children["ar_n1x32_d384"].data.tags["cascade.restarts"] == "1"


@pytest.mark.parametrize("grids,extra,needle", [
    ("  - size: [[1, 32]]\n    heads: [2]\n", "", "grid 0: unknown axis 'heads'"),
    ("  - size: []\n", "", "grid 0: axis 'size' has no values"),
    ("  - {}\n", "", "grid 0 is empty"),
    ("", "", "`grids:` is empty"),
    ("  - size: [[1, 32]]\n", "learning_rate: 0.1\n", "unknown sweep key 'learning_rate'"),
    ("  - size: [[1, 48]]\n", "", "width 48 is not a multiple of head_dim 32"),
    ("  - size: [[1, 32]]\n", "", "no `tokens` axis"),
    ("  - size: [[1, 32]]\n    tokens: [384]\n    block_size: [5]\n", "",
     "run bd5_n1x32_d384: "),  # the run's own config error, named with the run
])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, grids, extra, needle):
    proc = cascade("sweep", sweep_file(tmp_path, grids, extra))
    err = proc.stderr
    assert proc.returncode == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "tiny").exists()


def test_runs_that_do_not_fit_the_cluster_profile_are_refused_before_submission(tmp_path):
    big = sweep_file(tmp_path, "  - size: [[2, 256], [48, 8192]]\n    tokens: [1.0e9]\n",
                     name="big")
    proc = cascade("sweep", big, "data.seq_len=4096", "train.micro_batch_size=4",
                   "checkpoint.interval=5", "train.global_batch_size=256", "--executor", "slurm",
                   "--cluster", "h100")
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "run bd16_n48x8192_d1B does not fit cluster profile 'h100': needs " in err, err
    assert "GiB per GPU (cascade plan), more than the profile's 80 GiB" in err
    slow = sweep_file(tmp_path, "  - size: [[2, 64]]\n    tokens: [1.0e8]\n", "nodes: 1\n",
                      name="slow")
    proc = cascade("sweep", slow, "checkpoint.interval=1000000", "--executor", "slurm",
                   "--cluster", "local")
    assert proc.returncode == 2
    assert "does not fit cluster profile 'local': time limit 00:30:00" in proc.stderr
    assert not (tmp_path / "big").exists() and not (tmp_path / "slow").exists()


def test_gpu_sweep_files_report_their_device_hours():
    for name in ("h100_scaling", "h100_block_size"):
        proc = cascade("sweep", f"{ROOT}/configs/sweeps/{name}.yaml", "--executor", "slurm",
                       "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert "device-hours at 989 TFLOP/s x MFU 0.4 (h100)" in proc.stdout.splitlines()[-1]


def test_an_expert_axis_expands_into_moe_runs_counted_by_their_active_parameters(tmp_path):
    """`experts` / `top_k` axes: the dense point (0 experts) and each MoE point are runs of
    their own, labelled apart for the fit; an MoE run's N counts the dense weights and top-k / E
    of the experts', its compute the active experts (`diffusion/flops.py`)."""
    from cascade_mega.plan import layer_parameters
    from cascade_mega.sweep.spec import expand, load_sweep

    path = sweep_file(tmp_path, "  - size: [[2, 64]]\n    tokens: [384]\n    block_size: [4]\n"
                      "    experts: [0, 4]\n    top_k: [2, 3]\n")
    runs = {r.name: r for r in expand(load_sweep(path))}
    assert set(runs) == {"bd4_n2x64_d384", "bd4_e4k2_n2x64_d384", "bd4_e4k3_n2x64_d384"}
    dense, moe = runs["bd4_n2x64_d384"], runs["bd4_e4k2_n2x64_d384"]
    assert moe.cfg.model.moe.num_experts == 4 and moe.cfg.model.moe.top_k == 2
    assert moe.label == "bd4_e4k2" and dense.cfg.model.moe.num_experts is None
    d, e = layer_parameters(moe.cfg, 100, True)
    assert moe.params == 2 * (d + e // 2)  # two layers: dense weights, half of the 4 experts
    assert runs["bd4_e4k3_n2x64_d384"].flops > moe.flops > 0
