"""bf16 as a GPU trains: every objective trains, saves, resumes exactly and decodes in bf16 on this
CPU (torch's CPU kernels run bf16; block and AR checkpoints evaluate in bf16 too), and a bf16
model holds no fp32 parameter by accident.

megatron-core's mixed-precision optimizer keeps fp32 main copies of the `params_dtype` (bf16)
parameters and checkpoints them; a parameter left in fp32 is filed apart and its checkpoint
state maps to no model parameter, so the first save of such a run fails (the local spec's norms
did, before they took the config's dtype). Layouts across processes in bf16: test_torchrun.py
(DP 2 with the distributed optimizer), test_moe.py (EP 2).
"""

import json

import pytest
import torch

from helpers import cascade, train

from cascade_mega.config import load_config
from cascade_mega.train.trainer import Trainer

BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "data.seq_len=32", "diffusion.block_size=8",
        "train.steps=4", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.log_interval=1", "train.eval_interval=2", "train.eval_batches=1",
        "optimizer.warmup_steps=1", "checkpoint.interval=2", "tracking.enabled=false",
        "train.precision=bf16"]

# every objective and the options that own parameters or change the streams
VARIANTS = {
    "block": [],
    "ar": ["diffusion.objective=ar"],
    "full": ["diffusion.block_size=32"],
    "conversion": ["diffusion.shifted_prediction=true", "diffusion.views=2",
                   "diffusion.complementary=true", "diffusion.ar_loss_weight=0.5",
                   "diffusion.block_size_schedule={0: 4, 2: 8}", "data.document_mask=true"],
    "time_score_entropy": ["model.time_conditioning=true", "diffusion.loss=score_entropy",
                           "model.qk_norm=true", "model.tie_embeddings=false"],
    "moe": ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.aux_loss_coeff=0.01"],
    "distill": ["distill.teacher={teacher}", "distill.weight=0.5"],
}


def _run(run_dir, extra):
    return train(load_config(None, [f"run_dir={run_dir}", *BASE, *extra]))[1]


def _losses(records):
    return [(r["step"], r["split"], r["loss"], r.get("grad_norm")) for r in records]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A bf16 AR run, the distillation variant's teacher."""
    run = tmp_path_factory.mktemp("teacher") / "ar"
    _run(run, ["diffusion.objective=ar", "train.steps=2", "train.eval_interval=0"])
    return run


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_trains_saves_resumes_exactly_and_decodes(megatron, tmp_path, variant, request):
    extra = [x.format(teacher=request.getfixturevalue("teacher")) if "{teacher}" in x else x
             for x in VARIANTS[variant]]
    straight = _run(tmp_path / "straight", extra)  # checkpoints at steps 2 and 4
    # a second run directory resumed from the first's step-2 bf16 checkpoint
    resumed = _run(tmp_path / "stopped", extra + [
        f"train.resume={tmp_path}/straight/checkpoints/iter_0000002"])
    assert _losses(resumed) == [x for x in _losses(straight) if x[0] > 2]
    # what the run trains is bf16, and the checkpoint decodes
    assert "precision: bf16" in (tmp_path / "stopped/config.yaml").read_text()
    proc = cascade("generate", "--ckpt", tmp_path / "stopped", "--prompt", "To be",
                   "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert 1 <= len(out["tokens"]) <= 12, out
    if variant in ("block", "ar"):  # and evaluates in bf16 (lm-eval over the project's scorer)
        proc = cascade("eval", tmp_path / "stopped", "--tasks", "shakespeare_next_line",
                       "--limit", "2", "--mc-samples", "2", "--precision", "bf16", "--json")
        assert proc.returncode == 0, proc.stderr
        runs = json.loads(proc.stdout.splitlines()[-1])["runs"]
        values = [v for run in runs.values() for task in run.values() for v in task.values()
                  if isinstance(v, float)]
        assert values and all(v == v for v in values), runs  # numbers, none NaN


def test_a_bf16_checkpoint_exports_and_converts_back_bit_exact(megatron, tmp_path):
    """mcore-to-hf of a bf16 run, hf-to-mcore of the export: every weight back unchanged."""
    from test_convert import _weights

    run = tmp_path / "run"
    _run(run, ["train.steps=2", "train.eval_interval=0"])
    hf, back = tmp_path / "hf", tmp_path / "back"
    for args in (("mcore-to-hf", run, hf), ("hf-to-mcore", hf, back, "--seq-len", "32",
                                            "--dtype", "bf16")):
        proc = cascade("convert", *args)
        assert proc.returncode == 0, proc.stderr
    first, second = _weights(run), _weights(back)
    assert first.keys() == second.keys()
    for name in first:
        # read back in fp32: the bf16 weights, exactly
        assert torch.equal(first[name].bfloat16().float(), first[name]), name
        assert torch.equal(first[name], second[name]), name


# Parameters that stay fp32 in a bf16 model, each with its reason. None today: every module,
# the norms and the noise-level embedder included, is built in params_dtype; what needs fp32
# numerics computes in fp32 from bf16 weights (the norms' statistics, the loss and the logits,
# softmax statistics and log-sum-exp merges, the noise-level embedder's sinusoidal features).
FP32_ON_PURPOSE: dict = {}


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_no_fp32_parameter_by_accident(megatron, tmp_path, distributed_optimizer):
    """A bf16 model with every parameter-owning option: each parameter is bf16 unless listed
    above with its reason, and the optimizer keeps an fp32 main copy of each (none of them in
    megatron's fp32-from-fp32 groups, whose checkpoint state maps to no model parameter)."""
    extra = VARIANTS["time_score_entropy"] + VARIANTS["moe"] + [
        f"parallel.distributed_optimizer={str(distributed_optimizer).lower()}"]
    cfg = load_config(None, [f"run_dir={tmp_path}/run", *BASE, *extra])
    trainer = Trainer(cfg, []).setup()
    names = {}
    for chunk in trainer.chunks:
        for name, p in chunk.named_parameters():
            names[id(p)] = name
            if p.dtype != torch.bfloat16:
                assert name in FP32_ON_PURPOSE, f"{name} is {p.dtype} in a bf16 model"
    assert any("noise_embedding" in n for n in names.values())
    assert any("experts" in n for n in names.values())
    assert any("layernorm" in n for n in names.values())
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    mains = 0
    for opt in optimizers:
        for group in getattr(opt, "fp32_from_fp32_groups", []):
            stray = [names.get(id(p), "?") for p in group if names.get(id(p)) not in
                     FP32_ON_PURPOSE]
            assert not stray, f"fp32 parameters outside the main copies: {stray}"
        for group in opt.optimizer.param_groups:  # what Adam updates: fp32 main parameters
            for p in group["params"]:
                assert p.dtype == torch.float32
                mains += p.numel()
    # the main copies cover the model (this one process holds all of it)
    assert mains == sum(p.numel() for c in trainer.chunks for p in c.parameters())
