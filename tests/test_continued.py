"""Continued pretraining: the auxiliary AR stream, the block-size schedule and distillation.

References are independent computations: the AR loss against the same weights run with the `ar`
objective, the distillation KL in float64 from the teacher's own AR logits and the student's
logits, the tensor-parallel KL against the unsplit vocabulary (two gloo processes).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cascade_mega.config import ConfigError, load_config
from cascade_mega.config.objectives import layout_of
from cascade_mega.diffusion import objective
from cascade_mega.diffusion.masks import AttentionLayout
from cascade_mega.model.gpt import logits_at_rows, vocab_parallel_kl
from cascade_mega.diffusion import distill
from helpers import MASK_ID, random_tokens, score, tiny_cfg, tiny_model


def test_causal_stream_mask_is_the_layout_beside_a_causal_block():
    L = 8
    base = AttentionLayout("block_diffusion", L, 4)
    both = AttentionLayout("block_diffusion", L, 4, causal_stream=True)
    m = both.dense()
    assert m.shape == (3 * L, 3 * L)
    assert torch.equal(m[:2 * L, :2 * L], base.dense())
    assert torch.equal(m[2 * L:, 2 * L:], torch.ones(L, L, dtype=torch.bool).tril())
    assert not m[:2 * L, 2 * L:].any() and not m[2 * L:, :2 * L].any()


@pytest.mark.parametrize("extra", [[], ["diffusion.shifted_prediction=true"],
                                   ["diffusion.block_size=16"], ["diffusion.clean_stream=causal"],
                                   ["diffusion.clean_stream=causal",
                                    "diffusion.shifted_prediction=true", "diffusion.views=2"]])
def test_auxiliary_ar_loss_is_the_ar_loss_of_the_same_weights(megatron, extra):
    """The NELBO part is unchanged by the extra stream, and the stream's CE is what the same
    weights give as an AR model; the loss adds it with its weight. A causal clean stream
    (`diffusion.clean_stream`) is that stream itself: no row is added."""
    w = 0.3
    cfg = tiny_cfg(*extra)
    cfg_aux = tiny_cfg(*extra, f"diffusion.ar_loss_weight={w}")
    cfg_ar = tiny_cfg("diffusion.objective=ar")
    model = tiny_model(cfg, seed=3)
    b, L = 3, 16
    gen = torch.Generator().manual_seed(4)
    tokens = random_tokens(b, L + 1, gen)
    tokens, labels = tokens[:, :-1], tokens[:, 1:]
    mask = (torch.rand(b, L, generator=gen) > 0.2).float()  # some positions not scored
    noise = objective.draw_noise(cfg, b, gen)
    plain = objective.prepare(tokens, labels, mask, cfg, MASK_ID, noise)
    aux = objective.prepare(tokens, labels, mask, cfg_aux, MASK_ID, noise)
    ar = objective.prepare(tokens, labels, mask, cfg_ar, MASK_ID, None)
    assert aux.input_ids.shape[1] == layout_of(cfg_aux).rows
    if "diffusion.clean_stream=causal" in extra:
        assert torch.equal(aux.input_ids, plain.input_ids)
    assert aux.readout.labels.shape[1] == layout_of(cfg_aux).readout
    loss_p, stats_p = objective.reduce(*score(model, plain), plain)
    loss_a, stats_a = objective.reduce(*score(model, aux), aux)
    _, stats_r = objective.reduce(*score(model, ar), ar)
    torch.testing.assert_close(stats_a.pack()[:4], stats_p.pack()[:4], rtol=1e-5, atol=1e-6)
    assert stats_a.ar_targets == mask.sum() and stats_r.tokens == mask.sum()
    torch.testing.assert_close(stats_a.ar_loss, stats_r.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_a.double(), loss_p.double() + w * stats_r.loss, rtol=1e-5,
                               atol=1e-5)


def test_block_size_schedule(megatron):
    cfg = tiny_cfg("diffusion.block_size=8", "diffusion.block_size_schedule={0: 2, 5: 4, 8: 8}")
    assert [objective.at_step(cfg, s).diffusion.block_size for s in (0, 4, 5, 7, 8, 9)] == \
        [2, 2, 4, 4, 8, 8]
    prep = objective.prepare(random_tokens(2, 16), random_tokens(2, 16), torch.ones(2, 16),
                             objective.at_step(cfg, 6), MASK_ID, torch.Generator())
    assert prep.layout.block_size == 4
    for bad, what in [("{0: 2, 5: 4}", "must end at"), ("{0: 2, 10: 8}", "not before"), ("{1: 8}", "start at step 0"),
                      ("{0: 3, 5: 8}", "does not divide"), ("{0: 4, 8: 8, 5: 2}", "out of order")]:
        with pytest.raises(ConfigError, match=what):
            tiny_cfg("diffusion.block_size=8", f"diffusion.block_size_schedule={bad}")
    # block size 1 is an AR phase: the ar objective on L rows; it needs shifted prediction
    ar = tiny_cfg("diffusion.block_size=8", "diffusion.shifted_prediction=true",
                  "diffusion.block_size_schedule={0: 1, 5: 8}", "diffusion.ar_loss_weight=0.5")
    assert [(objective.at_step(ar, s).diffusion.objective, layout_of(
        objective.at_step(ar, s)).rows) for s in (4, 5)] == [("ar", 16), ("block_diffusion", 48)]
    for extra, what in [((), "needs 'diffusion.shifted_prediction'"),
                        (("diffusion.shifted_prediction=true", "distill.teacher=runs/ar"),
                         "cannot be distilled")]:
        with pytest.raises(ConfigError, match=what):
            tiny_cfg("diffusion.block_size=8", "diffusion.block_size_schedule={0: 1, 5: 8}",
                     *extra)


@pytest.mark.parametrize("recipe,phases", [
    ("smollm2_135m_wsd_cpu.yaml", {0: "causal", 10: "block_diffusion", 30: "full",
                                   45: "block_diffusion"}),
    ("qwen2.5_7b_wsd_h100.yaml", {0: "causal", 500: "block_diffusion", 2000: "full",
                                  14000: "block_diffusion"})])
def test_the_warmup_stable_decay_recipes_pass_through_every_layout(recipe, phases):
    """LLaDA 2.0's shape: AR, block diffusion, the whole sequence as one block, block diffusion
    again, ending at the block size the model decodes with."""
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "configs", "recipes", recipe), [], world_size=0)
    for step, kind in phases.items():
        assert layout_of(objective.at_step(cfg, step)).kind == kind, (recipe, step)
    assert objective.at_step(cfg, cfg.train.steps - 1).diffusion.block_size == \
        cfg.diffusion.block_size == 32


@pytest.mark.parametrize("shifted", [False, True])
def test_distillation_kl_against_float64_reference(megatron, shifted):
    """The KL term of the loss and its gradient on the student's logits equal a float64
    computation from the teacher's own AR logits (row i-1 predicts position i) and the student's
    logits at each masked target."""
    flag = f"diffusion.shifted_prediction={str(shifted).lower()}"
    cfg = tiny_cfg(flag)
    student = tiny_model(cfg, seed=1)
    teacher = tiny_model(tiny_cfg("diffusion.objective=ar"), seed=2)
    b, L, weight = 2, 16, 0.7
    gen = torch.Generator().manual_seed(5)
    tokens = random_tokens(b, L, gen)
    prep = objective.prepare(tokens, tokens, torch.ones(b, L), cfg, MASK_ID,
                             objective.draw_noise(cfg, b, gen))
    prep = distill.targets(prep, tokens, weight)
    teacher.requires_grad_(False)  # frozen, as the trainer's teacher
    ce, correct, kl = distill.forward(student, teacher, prep)
    loss, stats = objective.reduce(ce, correct, prep, kl)
    nelbo, _ = objective.reduce(ce, correct, prep)

    pos = prep.target_pos
    t_logits = teacher(tokens, torch.arange(L).expand(b, L), AttentionLayout("causal", L),
                       output_processor=logits_at_rows, output_processor_context=None)
    s_logits = student(prep.input_ids, prep.position_ids, prep.layout,
                       output_processor=logits_at_rows,
                       output_processor_context=prep.readout.rows).double().detach()
    s_logits.requires_grad_(True)
    V = MASK_ID  # real vocabulary: [MASK] and padding are -inf in both
    log_t = t_logits.double()[:, :, :V].log_softmax(-1)  # [L, b, V]
    log_s = s_logits[:, :, :V].log_softmax(-1)  # [n, b, V]
    masked = prep.scored & (pos > 0)
    ref_kl = (log_t.exp()[(pos - 1).clamp(min=0)] *
              (log_t[(pos - 1).clamp(min=0)] - log_s)).sum(-1).t()  # [b, n]
    ref = weight * (ref_kl * masked).sum()
    assert masked.sum() > 4 and ref > 0.05
    torch.testing.assert_close((kl.double() * prep.distill_weight).sum(), ref.detach(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), (nelbo.double() + ref).detach(), rtol=1e-6,
                               atol=1e-5)  # fp32 sums of a few hundred
    torch.testing.assert_close(stats.distill_kl, (ref_kl * masked).sum(), rtol=1e-5, atol=1e-6)
    assert stats.distill_targets == masked.sum()
    # the KL's gradient on the student's weights, through `predict_and_score` (where the
    # cross-entropy later overwrites the logits in place), against float64 autograd
    student.zero_grad()
    (loss - nelbo).backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    rows64 = student(prep.input_ids, prep.position_ids, prep.layout,
                     output_processor=logits_at_rows,
                     output_processor_context=prep.readout.rows).double()[:, :, :V]
    kl64 = (log_t.exp()[(pos - 1).clamp(min=0)] *
            (log_t[(pos - 1).clamp(min=0)] - rows64.log_softmax(-1))).sum(-1).t()
    (weight * (kl64 * masked).sum()).backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(got[name].double(), param.grad.double(), rtol=1e-3,
                                   atol=1e-6, msg=name)
    assert any(g.abs().max() > 1e-4 for g in got.values())


def _kl_rank(rank, port, student, teacher, out):
    from megatron.core import parallel_state

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    part = student.shape[-1] // 2
    s = student[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher[..., rank * part:(rank + 1) * part])
    (kl * torch.arange(1.0, kl.numel() + 1).view_as(kl)).sum().backward()
    torch.save((kl.detach(), s.grad), f"{out}.{rank}")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def test_vocab_parallel_kl_at_tensor_parallel_2(tmp_path):
    """Two gloo processes, each holding half the vocabulary, give the unsplit KL and gradient."""
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(5, 2, 32, generator=gen) * 3
    teacher = torch.randn(5, 2, 32, generator=gen) * 3
    student[..., 30:] = teacher[..., 30:] = float("-inf")  # never-predicted ids, as in the model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "kl")
    mp.start_processes(_kl_rank, args=(port, student, teacher, out), nprocs=2,
                       start_method="spawn")
    ref_s = student.double().requires_grad_(True)
    log_t = teacher.double().log_softmax(-1)
    terms = torch.where(log_t.isinf(), 0.0, log_t.exp() * (log_t - ref_s.log_softmax(-1)))
    ref = terms.sum(-1)
    (ref * torch.arange(1.0, ref.numel() + 1).view_as(ref)).sum().backward()
    for rank in range(2):
        kl, grad = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_s.grad[..., rank * 16:(rank + 1) * 16],
                                   rtol=1e-4, atol=1e-6)
    assert not os.path.exists(f"{out}.2")


def test_distillation_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="auxiliary loss of block diffusion"):
        tiny_cfg("diffusion.objective=ar", "diffusion.ar_loss_weight=0.5")
    with pytest.raises(ConfigError, match="'distill.teacher' has no context-parallel path"):
        tiny_cfg("distill.teacher=/x", "parallel.context=2")
    with pytest.raises(ConfigError, match="no interleaved-pipeline path"):
        tiny_cfg("distill.teacher=/x", "parallel.pipeline=2", "parallel.virtual_pipeline=2")
    with pytest.raises(ConfigError, match="objective' must be block_diffusion"):
        tiny_cfg("distill.teacher=/x", "diffusion.objective=ar")


QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
             "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
             "tie_word_embeddings": False, "vocab_size": 152064, "hidden_act": "silu",
             "use_sliding_window": False, "max_position_embeddings": 131072}
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "rope_theta": 100000.0, "rms_norm_eps": 1e-05,
                "tie_word_embeddings": True, "vocab_size": 49152, "hidden_act": "silu"}


QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
                 "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "rope_theta": 1000000.0,
                 "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "vocab_size": 151936,
                 "hidden_act": "silu", "max_position_embeddings": 40960, "num_experts": 128,
                 "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
                 "attention_bias": False, "use_sliding_window": False}


@pytest.mark.parametrize("recipe, hf, gpus, tokens", [
    ("qwen2.5_7b_h100.yaml", QWEN25_7B, 64, 151665),
    ("smollm2_135m_cpu.yaml", SMOLLM2_135M, 1, 49152),
    ("qwen3_30b_a3b_h100.yaml", QWEN3_30B_A3B, 64, 151669)])
def test_recipes_describe_the_converted_models(recipe, hf, gpus, tokens):
    """Each recipe's model section is what `cascade convert hf-to-mcore` makes of the model's
    Hugging Face config (and its tokenizer's `tokens` + [MASK], in the converter's rows), and
    the recipe is a valid run at its layout."""
    from cascade_mega.convert.command import padded_rows

    from dataclasses import asdict

    from cascade_mega.config import load_config
    from cascade_mega.convert.hf import model_overrides

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "recipes", recipe)
    cfg = load_config(path, world_size=gpus)
    converted = load_config(path, model_overrides(hf), world_size=gpus)
    got, want = asdict(cfg.model), asdict(converted.model)
    assert got.pop("norm_epsilon") == pytest.approx(want.pop("norm_epsilon"))
    if not got["rope_scaling"]:
        got.pop("rope_scaling_factor"), want.pop("rope_scaling_factor")
    assert got == want
    d = cfg.diffusion
    assert cfg.train.init_from and d.objective == "block_diffusion"
    assert d.shifted_prediction == (recipe != "qwen3_30b_a3b_h100.yaml")  # SDAR: no shift
    assert cfg.model.vocab_size == padded_rows(max(tokens + 1, hf["vocab_size"]), hf, 1)


def test_distillation_aux_loss_and_schedule_at_tp2_and_pp2_match_single_process(tmp_path):
    """`cascade train` with a teacher, the auxiliary AR loss and a block-size schedule: two
    tensor-parallel ranks (sequence parallel), and two pipeline stages (the teacher's rows travel
    with the student's), give the single process's losses, gradient norms, KL and AR loss; the
    block size follows the schedule."""
    from test_torchrun import _assert_same, _run

    _run(tmp_path, "teacher", "diffusion.objective=ar", "train.steps=3", "train.eval_interval=0")
    # the teacher must read the student's token ids: another tokenizer is refused up front
    from types import SimpleNamespace

    from cascade_mega.data import loader

    student = tiny_cfg(f"distill.teacher={tmp_path}/teacher")
    own = loader.load_tokenizer(student.data, loader.resolve_path(student.data.path))
    assert distill.teacher_config(student, own)[0].diffusion.objective == "ar"
    other = SimpleNamespace(vocab_size=own.vocab_size, mask_id=own.mask_id, eod=own.eod,
                            encode=lambda text: own.encode(text)[::-1])
    with pytest.raises(ConfigError, match="another tokenizer"):
        distill.teacher_config(student, other)
    args = ["diffusion.block_size_schedule={0: 4, 2: 8}", "diffusion.ar_loss_weight=0.5",
            f"distill.teacher={tmp_path}/teacher", "distill.weight=0.3"]
    single = _run(tmp_path, "single", *args)
    tp2 = _run(tmp_path, "tp2", "--nproc-per-node", "2", *args, "parallel.tensor=2",
               "parallel.sequence_parallel=true")
    pp2 = _run(tmp_path, "pp2", "--nproc-per-node", "2", *args, "parallel.pipeline=2")
    train = [r for r in single if r["split"] == "train"]
    assert [r["block_size"] for r in train] == [4, 4, 8, 8]
    for other in (tp2, pp2):
        _assert_same(single, other)
        for a, b in zip(train, [r for r in other if r["split"] == "train"]):
            assert a["distill_kl"] > 0.01 and a["ar_loss"] > 1.0
            assert abs(a["distill_kl"] - b["distill_kl"]) < 1e-5
            assert abs(a["ar_loss"] - b["ar_loss"]) < 1e-5


def test_block_size_one_phase_trains_the_ar_objective_then_converts(tmp_path):
    """A schedule starting at B = 1 (shifted prediction) is an AR run until it switches: its
    first steps' losses and gradient norms are those of the `ar` objective (same seed and
    data); then block diffusion. Two pipeline stages (the rows per sample go from L to 2L at
    the switch) give the single process's figures."""
    from test_torchrun import _assert_same, _run

    args = ["diffusion.shifted_prediction=true", "diffusion.block_size_schedule={0: 1, 2: 8}"]
    single = _run(tmp_path, "single", *args)
    ar = [r for r in _run(tmp_path, "ar", "diffusion.objective=ar") if r["split"] == "train"]
    train = [r for r in single if r["split"] == "train"]
    assert [r["block_size"] for r in train] == [1, 1, 8, 8]
    _assert_same(train[:2], ar[:2])
    assert abs(train[2]["loss"] - ar[2]["loss"]) > 1e-2  # block diffusion from the switch
    _assert_same(single, _run(tmp_path, "pp2", "--nproc-per-node", "2", *args,
                              "parallel.pipeline=2"))
