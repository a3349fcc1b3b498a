"""`cascade eval` through lm-evaluation-harness (the real harness, the shipped offline tasks).

Runs: an AR Llama and a block-diffusion Qwen2 (B = 4) made by `hf-to-mcore` from small random
Hugging Face models, and the tiny megatron model of the objective's tests. References: the AR
log-likelihoods against a float64 log-softmax of the model's full-vocabulary logits; the
diffusion bound against its exact value by enumeration (`helpers.exact_block_nelbo`);
`generate_until` against `cascade generate`."""

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
        assert abs(mean - value) < 4 * se and se < 0.05 * value, (mean, value, se)
    # the same noise draws whatever the other choices are
    assert alone[0] == pytest.approx(m2, rel=1e-6)


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
