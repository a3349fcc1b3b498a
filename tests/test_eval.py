"""`cascade eval` through lm-evaluation-harness (the real harness, the shipped offline tasks).

Runs: an AR Llama and a block-diffusion Qwen2 (B = 4) made by `hf-to-mcore` from small random
Hugging Face models, and the tiny megatron model of the objective's tests. References: the AR
log-likelihoods against a float64 log-softmax of the model's full-vocabulary logits; the
diffusion bound against its exact value by enumeration (`helpers.exact_block_nelbo`), a 1-token
continuation against the block decoder's view of it, its spread against today's 1/t draw written
out again here and against its own reported standard error; `generate_until` against
`cascade generate`."""

import json
import os

import pytest
import torch

from helpers import MASK_ID, cascade, exact_block_nelbo, tiny_cfg, tiny_model
from test_convert import hf_model

TASKS = "shakespeare_next_line,shakespeare_cloze"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for name, kind, options in (("ar", "llama", []),
                                ("block", "qwen2", ["--objective", "block_diffusion",
                                                    "--block-size", "4"])):
        hf_model(kind, root / f"{name}_hf")
        proc = cascade("convert", "hf-to-mcore", root / f"{name}_hf", root / name,
                       "--seq-len", "64", *options)
        assert proc.returncode == 0, proc.stderr
        out[name] = root / name
    return out


def _lm(run, **kwargs):
    from cascade_mega.evaluation.harness import CascadeLM
    from cascade_mega.inference.load import load_decoder

    d = load_decoder(str(run), precision="fp32")
    return CascadeLM(d.net.cfg, d.net.tok, d.net.model, d, **kwargs), d


def _requests(*args):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]


PAIRS = [("ROMEO: But soft, what light", " through yonder window"),
         ("JULIET:", " O Romeo, Romeo"), ("", "To be, or not to be")]


def test_ar_loglikelihoods_are_the_model_s_own(runs):
    from lm_eval.api.instance import Instance

    from cascade_mega.diffusion.masks import AttentionLayout
    from cascade_mega.model.gpt import read_out_logits

    lm, d = _lm(runs["ar"])
    d = d.net  # the run's model, config and tokenizer
    got = lm.loglikelihood(_requests(*PAIRS))

    def logits(*, hidden_states, output_layer, output_weight, **_):
        return read_out_logits(hidden_states, output_layer, output_weight, None, True)

    for (context, continuation), (ll, greedy) in zip(PAIRS, got):
        ctx = d.tok.encode(context.rstrip()) or [d.tok.eod]
        whole = d.tok.encode(context + continuation) if context else ctx + d.tok.encode(
            continuation)
        cont = whole[len(ctx):]
        ids = torch.tensor([whole])
        with torch.no_grad():
            out = d.model(ids, torch.arange(len(whole))[None], AttentionLayout("causal",
                          len(whole)), output_processor=logits)
        allowed = out[:, 0].double()[:, :d.tok.vocab_size]  # [MASK] is never predicted
        allowed[:, d.tok.mask_id] = float("-inf")
        logp = allowed.log_softmax(-1)
        rows = logp[len(ctx) - 1:len(whole) - 1]
        assert abs(ll - float(rows.gather(1, torch.tensor(cont)[:, None]).sum())) < 1e-5
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
    # a document shorter than the context is one rolling window after end-of-text
    rolled, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (PAIRS[2][1],), 0)])
    assert rolled == pytest.approx(got[2][0], abs=1e-5)  # batched apart: float rounding


def test_the_diffusion_bound_converges_to_its_exact_value(megatron):
    """A tiny model (L = 8, B = 4): the context ends inside block 0, a continuation spans the
    rest of it and part of block 1 (whose tail is [MASK]); another is shorter."""
    from cascade_mega.evaluation.likelihood import nelbo_bounds

    cfg = tiny_cfg("data.seq_len=8", "diffusion.block_size=4")
    model = tiny_model(cfg, seed=9)
    context, long, short = [5, 17, 30], [8, 2, 33, 21], [8, 11]
    with torch.no_grad():
        exact = [exact_block_nelbo(model, 4, context, c) for c in (long, short)]
        (m1, se1), (m2, se2) = nelbo_bounds(model, cfg, MASK_ID, context, [long, short], 2048)
        alone, = nelbo_bounds(model, cfg, MASK_ID, context, [short], 2048)
    for mean, se, value in ((m1, se1, exact[0]), (m2, se2, exact[1])):
        # the short one has one target per block: exact (k = 1), its standard error 0
        assert abs(mean - value) <= 4 * se + 1e-6 * value and se < 0.05 * value, (mean, value, se)
    # the same noise draws whatever the other choices are
    assert alone[0] == pytest.approx(m2, rel=1e-6)


def test_the_stratified_counts_weigh_every_count_equally():
    """The estimate's weight on each masked count k is exactly 1 / n, for every n and S: a
    draw's k(U) is constant on U in [i/n, (i+1)/n), so the midpoints of those n intervals give
    the exact average over U (the estimate is linear in the draws' values)."""
    from fractions import Fraction

    from cascade_mega.evaluation.likelihood import estimate, masked_counts, strata

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(30):
        n, S = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        mids = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).expand(S, n)
        k = masked_counts(mids, torch.full((n,), n))  # [S draws, n midpoints]
        j, m = strata(S)
        for value in range(1, n + 1):
            weight = sum(Fraction(estimate((k[:, i] == value).double())[0]).limit_denominator(
                10**6) for i in range(n)) / n
            assert weight == Fraction(1, n), (n, S, value, weight)
        # the draws of stratum j have their k in ((j/m) n, ((j+1)/m) n]: 1 + floor of it
        assert all(n * int(j[s]) < m * int(v) <= n * int(j[s]) + n + m - 1
                   for s in range(S) for v in k[s]), (n, S)


def test_the_standard_error_is_the_stratified_draws_spread_where_the_iid_one_is_not():
    """float64, values with a trend in k (what stratification removes) and noise within: over
    2000 replicates of the draws, the reported error's root mean square is within 10 % of the
    estimates' spread (its own noise ~2 %); the iid formula over the draws is 2x off or more."""
    from cascade_mega.evaluation.likelihood import estimate, masked_counts

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for n, S in ((4, 8), (6, 8), (5, 7), (30, 16)):
        R = 2000  # replicates as the blocks of one call
        k = masked_counts(torch.rand(S, R, generator=g, dtype=torch.float64),
                          torch.full((R,), n)).double()
        y = 3 * k + torch.randn(S, R, generator=g, dtype=torch.float64) * (1 + k / n)
        got = torch.tensor([estimate(y[:, r]) for r in range(R)], dtype=torch.float64)
        spread = got[:, 0].std()
        assert abs(got[:, 1].pow(2).mean().sqrt() / spread - 1) < 0.1, (n, S)
        assert (y.var(0) / S).mean().sqrt() > 2 * spread, (n, S)


@pytest.mark.parametrize("conditioned", [False, True])
def test_a_one_token_continuation_is_its_exact_conditional_log_likelihood(megatron, conditioned):
    """k = 1, weight 1: the token masked, its block as the block decoder sees it (the context's
    tail given, the rest [MASK]; a time-conditioned model fed the block's masked share)."""
    from cascade_mega.evaluation.likelihood import nelbo_bounds
    from test_generate import _block_logits

    cfg = tiny_cfg("model.init_std=0.3", *["model.time_conditioning=true"] * conditioned)
    model = tiny_model(cfg, seed=int(torch.randint(0, 1000, ())))
    with torch.no_grad():
        for p in getattr(model, "noise_embedding", torch.nn.Linear(1, 1)).parameters():
            p.normal_(0, 0.3)  # a level that matters
        for n in (5, 8):  # the token inside a block, at a block's start
            context = torch.randint(0, MASK_ID, (n,)).tolist()
            token = int(torch.randint(0, MASK_ID, ()))
            full = n // 4 * 4
            x = torch.tensor(context[full:] + [MASK_ID] * (4 - n + full))
            logp = _block_logits(model, context[:full], x).double().log_softmax(-1)
            want = -float(logp[n - full, token])
            (one, se), = nelbo_bounds(model, cfg, MASK_ID, context, [[token]], 4, seed=0)
            (two, _), = nelbo_bounds(model, cfg, MASK_ID, context, [[token]], 4, seed=1)
            assert one == two and se == 0 and one == pytest.approx(want, abs=1e-5)


def _one_over_t(model, cfg, context, continuation, samples, seeds, batch=512):
    """The former draw, per seed: per block t_s = 1 - (s + U) / S, each target masked with
    probability t, weight 1/t (the context clean, the tail [MASK])."""
    from cascade_mega.diffusion.noise import Noise
    from cascade_mega.diffusion.objective import prepare
    from cascade_mega.evaluation.likelihood import scoring_config
    from helpers import score

    cfg = scoring_config(cfg)
    B = cfg.diffusion.block_size
    end = len(context) + len(continuation)
    P = -(-end // B) * B
    tokens = torch.tensor(context + continuation + [MASK_ID] * (P - end))
    target = (torch.arange(P) >= len(context)) & (torch.arange(P) < end)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    offset = torch.rand(len(seeds), 1, P // B, generator=g, dtype=torch.float64)
    t = 1.0 - (torch.arange(samples, dtype=torch.float64)[:, None] + offset) / samples
    t = t.repeat_interleave(B, -1).reshape(-1, P)
    u = torch.rand(t.shape, generator=g, dtype=torch.float64)
    u = torch.where(target, u, torch.where(torch.arange(P) >= end, -1.0, 2.0))
    values = []
    for i in range(0, len(t), batch):
        n = len(t[i:i + batch])
        loss_mask = torch.cat([target[1:], target[:1] & False]).float().expand(n, P)
        prep = prepare(tokens.expand(n, P), tokens.expand(n, P), loss_mask, cfg, MASK_ID,
                       Noise(t[i:i + batch, None], u[i:i + batch, None]))
        ce = score(model, prep)[0].double()
        values.append(torch.where(prep.weight > 0, ce * prep.weight, 0.0).sum(1))
    return torch.cat(values).view(len(seeds), samples).mean(1)


@pytest.mark.parametrize("block", [4, 32])  # block diffusion; full diffusion (B = L)
def test_the_bound_s_spread_is_below_the_1_over_t_draw_s_and_its_error_matches_it(megatron,
                                                                                   block):
    """4 and 30 tokens, 8 draws: the spread of the estimate over 400 seeds is within 20 % of the
    standard error it reports (their root mean square; the spread of a spread over 400 seeds is
    ~4 %, more with heavier tails) and below the spread of the former 1/t draw (over 100)."""
    from cascade_mega.evaluation.likelihood import nelbo_bounds

    cfg = tiny_cfg("data.seq_len=32", f"diffusion.block_size={block}", "model.num_layers=1",
                   "model.init_std=0.3")
    model = tiny_model(cfg, seed=int(torch.randint(0, 1000, ())))
    context = torch.randint(0, MASK_ID, (2,)).tolist()
    choices = [torch.randint(0, MASK_ID, (n,)).tolist() for n in (4, 30)]
    seeds, samples = range(400), 8
    with torch.no_grad():
        got = torch.tensor([nelbo_bounds(model, cfg, MASK_ID, context, choices, samples, seed,
                                         batch=256) for seed in seeds], dtype=torch.float64)
        for i, x in enumerate(choices):
            former = _one_over_t(model, cfg, context, x, samples, seeds[:100])
            spread, reported = got[:, i, 0].std(), got[:, i, 1].pow(2).mean().sqrt()
            assert spread < former.std(), (len(x), spread, former.std())
            assert abs(reported / spread - 1) < 0.2, (len(x), reported, spread)


def test_generate_until_is_cascade_generate_cut_at_the_stop(runs):
    from lm_eval.api.instance import Instance

    context = "ROMEO: But soft"
    proc = cascade("generate", "--ckpt", runs["block"], "--prompt", context, "--max-new-tokens",
                   "12", "--precision", "fp32", "--json")
    assert proc.returncode == 0, proc.stderr
    text = json.loads(proc.stdout.splitlines()[-1])["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]  # a stop string the decoding will meet
    lm, _ = _lm(runs["block"])
    out, = lm.generate_until([Instance("generate_until", {}, (context, {
        "until": ["never said", stop], "max_gen_toks": 12}), 0)])
    assert stop and out == text[:text.index(stop)] and len(out) < len(text)


EVAL = ["--tasks", TASKS, "--limit", "4", "--mc-samples", "2", "--json"]


@pytest.fixture(scope="module")
def evaluated(runs):
    """Both runs side by side, the block-diffusion one tracked in MLflow."""
    from mlflow.tracking import MlflowClient

    from cascade_mega.config import load_config
    from cascade_mega.tracking import store

    uri = store.resolve_uri(load_config(str(runs["block"] / "config.yaml"), [], world_size=0))
    client = MlflowClient(uri)
    run_id = client.create_run(store.experiment_id(client, "eval-test")).info.run_id
    (runs["block"] / "mlflow_run_id").write_text(run_id)
    proc = cascade("eval", runs["block"], runs["ar"], *EVAL)
    assert proc.returncode == 0, proc.stderr
    return proc, client, run_id


def test_cascade_eval_prints_both_runs_and_logs_to_mlflow(runs, evaluated):
    proc, client, run_id = evaluated
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["bounds"] == {str(runs["block"]): True, str(runs["ar"]): False}
    for run in runs.values():
        tasks = result["runs"][str(run)]
        assert 0 <= tasks["shakespeare_next_line"]["acc"] <= 1
        assert tasks["shakespeare_cloze"]["perplexity"] > 1
    assert "shakespeare_cloze/perplexity" in proc.stdout and "bounds (-NELBO" in proc.stdout
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/shakespeare_next_line/acc"] == \
        result["runs"][str(runs["block"])]["shakespeare_next_line"]["acc"]


def test_data_parallel_ranks_give_one_process_s_figures(runs, evaluated):
    """Two ranks under torchrun (gloo) split the requests; the noise draws follow the
    questions, not the ranks, so every figure but the bootstrapped errors is the same."""
    from helpers import torchrun

    proc = torchrun(2, "-m", "cascade_mega", "eval", runs["block"], *EVAL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(proc.stdout.splitlines()[-1])["runs"][str(runs["block"])]
    one = json.loads(evaluated[0].stdout.splitlines()[-1])["runs"][str(runs["block"])]
    for task in one:
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in one[task]:
                assert two[task][metric] == pytest.approx(one[task][metric], rel=1e-9)


@pytest.mark.parametrize("case,needle", [
    ("task", "unknown task 'no_such_task': the local tasks are shakespeare_cloze, "
             "shakespeare_next_line"),
    ("data", "its data file"),
    ("tokenizer", "tokenizer file not found"),
])
def test_bad_input_is_one_message_before_any_model_loads(runs, tmp_path, case, needle):
    import shutil

    run, extra, tasks = runs["ar"], [], TASKS
    if case == "task":
        tasks = "no_such_task"
    elif case == "data":
        (tmp_path / "mine.yaml").write_text(
            "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            "    test: missing.jsonl\noutput_type: loglikelihood\n")
        extra, tasks = ["--include-path", tmp_path], "mine"
    else:
        run = tmp_path / "run"
        shutil.copytree(runs["ar"], run)
        text = (run / "config.yaml").read_text().replace(str(runs["ar"]), str(run))
        (run / "config.yaml").write_text(text)
        os.remove(run / "tokenizer.json")
    proc = cascade("eval", run, "--tasks", tasks, "--limit", "2", *extra)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
