"""Every path keeps its tensors on the model's device: run on a stand-in device that is not the host.

Under `standin_device.standin()` (see that module) a tensor created on the host by mistake raises
as soon as it meets a device tensor, as it would on a GPU. Each case runs a real training step
(forward, backward, optimizer) and an evaluation through the Trainer, or decodes with the real
decoders, and must give the same numbers as the same run on the CPU (the stand-in computes on CPU
data). On the code before the device work the first training step fails at its first forward
(host position ids meeting the device's RoPE table).

The host synchronisations of a training step are counted too (device-to-host reads and blocking
host-to-device copies): between logging steps only megatron's gradient-norm read-back remains.
"""

from types import SimpleNamespace

import pytest
import torch

from cascade_mega.config import load_config
from standin_device import STANDIN, Dev, StandInDeviceError, count_syncs, standin

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "data.seq_len=32", "diffusion.block_size=4", "train.steps=4",
        "train.micro_batch_size=2", "train.global_batch_size=4", "optimizer.warmup_steps=1",
        "tracking.enabled=false", "train.eval_batches=1", "train.eval_interval=0",
        "model.attention_kernel=tiled", "train.resume=none", "checkpoint.interval=100"]

OBJECTIVES = {
    "block_diffusion": [],
    "full_diffusion": ["diffusion.block_size=32"],
    "ar": ["diffusion.objective=ar"],
    "two_views": ["diffusion.views=2", "diffusion.complementary=true"],
    "aux_ar_shifted": ["diffusion.ar_loss_weight=0.5", "diffusion.shifted_prediction=true"],
    "documents": ["data.document_mask=true"],
    "score_entropy_timed": ["diffusion.loss=score_entropy", "model.time_conditioning=true"],
    "documents_ar": ["data.document_mask=true", "diffusion.objective=ar"],
    "schedule": ["diffusion.block_size_schedule={0: 1, 1: 4}", "diffusion.shifted_prediction=true"],
    # experts: the router's balancing and z-losses, the all-to-all dispatch, the load counters
    "moe": ["model.moe.num_experts=3", "model.moe.ffn_hidden_size=32",
            "model.moe.z_loss_coeff=0.01", "train.log_interval=1"],
}


def _cfg(tmp_path, name, extra):
    return load_config(None, [f"run_dir={tmp_path / name}", *TINY, *extra])


def _step_and_eval(cfg):
    from cascade_mega.train.trainer import Trainer

    trainer = Trainer(cfg, []).setup()
    return trainer, [trainer.train_step(0), trainer.train_step(1)], trainer.evaluate(0)


def _close(a: dict, b: dict):
    keys = {k for k in a if k not in ("step_time", "tokens_per_s", "memory_gb")}
    assert keys == set(b) - {"step_time", "tokens_per_s", "memory_gb"}
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_training_step_and_evaluation_on_the_device(megatron, tmp_path, name):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    cfg = _cfg(tmp_path, name, OBJECTIVES[name])
    _, host_steps, host_eval = _step_and_eval(cfg)
    # megatron-core keeps the balancing loss's backward scale in a class attribute, made on the
    # first run's device: the stand-in run in this same process makes its own
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    with standin():
        trainer, steps, valid = _step_and_eval(cfg)
        assert all(isinstance(p, Dev) for p in trainer.chunks[0].parameters())
        assert isinstance(trainer.chunks[0].module.output_layer.logit_bias, Dev)
    for a, b in zip(steps, host_steps):
        _close(a, b)
    _close(valid, host_eval)


def test_distillation_step_on_the_device(megatron, tmp_path, monkeypatch):
    from cascade_mega import checkpoint
    from cascade_mega.train.trainer import Trainer

    teacher = _cfg(tmp_path, "teacher", ["diffusion.objective=ar", "train.steps=2"])
    Trainer(teacher, []).setup().fit()  # a real AR run, found and checked as usual
    # torch's checkpoint reader treats the stand-in's `meta` device as "allocate later" and
    # refuses it, so the teacher keeps its initial weights in both runs (the step is what is
    # tested here; loading on a GPU is the ordinary CUDA path of torch's reader)
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: (0, 0))
    cfg = _cfg(tmp_path, "student", [f"distill.teacher={teacher.run_dir}",
                                     "diffusion.shifted_prediction=true"])
    _, host_steps, _ = _step_and_eval(cfg)
    with standin():
        trainer, steps, _ = _step_and_eval(cfg)
        assert isinstance(next(trainer.teacher.parameters()), Dev)
    assert "distill_kl" in steps[0]
    _close(steps[0], host_steps[0])


def test_host_synchronisations_of_a_training_step(megatron, tmp_path):
    cfg = _cfg(tmp_path, "syncs", ["diffusion.ar_loss_weight=0.5"])
    from cascade_mega.train.trainer import Trainer

    with standin():
        trainer = Trainer(cfg, []).setup()
        trainer.train_step(0)  # first step: caches, optimizer state
        with count_syncs() as quiet:
            trainer.train_step(1, log=False)
        with count_syncs() as logged:
            trainer.train_step(2, log=True)
    # megatron's gradient-norm clipping reads the norm back (the one unavoidable sync); the
    # micro-batches cross with non-blocking copies, the metric sums stay on the device
    assert quiet.reads == 1 and quiet.blocking_copies == 0, quiet
    assert logged.reads == 2 and logged.blocking_copies == 0, logged  # + the metric sums, once


def _decoder_model(cfg):
    from cascade_mega.model.gpt import build_model

    torch.manual_seed(0)
    model = build_model(cfg, 40, forbidden_ids=[39])
    return model.eval()


@pytest.mark.parametrize("name, extra", [
    ("block", ["diffusion.shifted_prediction=true"]), ("ar", ["diffusion.objective=ar"]),
    ("full", ["diffusion.block_size=32"])])
def test_decoders_on_the_device(megatron, tmp_path, name, extra):
    from cascade_mega.inference.load import decoder_for
    from cascade_mega.inference.policies import Policy
    from cascade_mega.inference.sampling import Sampling

    cfg = _cfg(tmp_path, name, extra + ["model.init_std=0.3"])
    tok = SimpleNamespace(mask_id=39, eod=38, decode=lambda ids: " ".join(map(str, ids)))
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    sampling = Sampling(greedy=False, top_p=0.9, seed=3)

    def run(options):
        model = _decoder_model(cfg)
        if name == "full":
            return [decoder_for(model, cfg, tok, **options).generate(
                prompts, 12, Policy("entropy", 3, order="entropy", remask=0.3), sampling)]
        return [decoder_for(model, cfg, tok).generate(
            prompts, 12, Policy("adaptive", steps=2, order="margin", remask=0.5), sampling)]

    options = [{"cache": "dual", "guidance": 0.5}, {"cache": "prefix"}] if name == "full" \
        else [{}]
    for opt in options:
        on_host = run(opt)
        with standin():
            on_device = run(opt)
        assert [[g.tokens for g in r] for r in on_device] == \
            [[g.tokens for g in r] for r in on_host]


def test_the_standin_catches_a_host_tensor():
    with standin() as dev:
        assert dev == STANDIN
        x = torch.ones(3, device=dev)
        with pytest.raises(RuntimeError, match="host tensor"):
            x + torch.ones(3)  # a factory without a device: the host
        x + torch.ones(3).to(dev)  # moved: fine
        x * 2.0 + torch.tensor(1.0)  # scalars are fine (CUDA takes them too)


def test_the_standin_refuses_what_cuda_memory_efficient_attention_refuses():
    """The memory-efficient attention ops on the stand-in refuse what CUDA's refuse (or read
    wrongly): see `standin_device` for the source check each one mirrors."""
    fwd = torch.ops.aten._scaled_dot_product_efficient_attention.default
    bwd = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default
    b, h, m, n, d = 2, 4, 18, 18, 8

    def bias(dtype, rows=n, width=n, shape=(b, h)):  # rows of `width` elements in memory
        return torch.zeros(m, width, dtype=dtype, device=dev)[:, :rows].expand(*shape, m, rows)

    with standin() as dev:
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for s in (m, n, n))
        good = bias(torch.bfloat16, width=32)
        out, lse, seed, offset = fwd(q, k, v, good, True)
        assert lse.shape == (b, h, 32) and lse.dtype == torch.float32  # padded to 32 rows
        bwd(out, q, k, v, good, out, lse, seed, offset, 0.0, [True, True, True, False])
        refused = {
            "only fp32, half & bf16": lambda: fwd(q.double(), k.double(), v.double(), None, True),
            "key/value dtypes": lambda: fwd(q, k.float(), v, None, True),
            "invalid dtype for bias": lambda: fwd(q, k, v, bias(torch.float32, width=32), True),
            "wrong shape": lambda: fwd(q, k, v, bias(torch.bfloat16, width=32, shape=(1, 1)),
                                       True),
            "attn_bias_ptr is not correctly aligned": lambda: fwd(  # starts 2 bytes in
                q, k, v, torch.zeros(m, 40, dtype=torch.bfloat16, device=dev)[:, 1:n + 1]
                .expand(b, h, m, n), True),
            "not correctly aligned \\(strideM\\).* multiple of 8": lambda: fwd(
                q, k, v, bias(torch.bfloat16), True),
            "LSE is not correctly aligned \\(strideH\\)": lambda: bwd(
                out, q, k, v, good, out, lse[..., :m].contiguous(), seed, offset, 0.0,
                [True, True, True, False]),
            "logsumexp rows must hold": lambda: bwd(
                out, q, k, v, good, out, lse[..., :16].contiguous(), seed, offset, 0.0,
                [True, True, True, False]),
        }
        for message, call in refused.items():
            with pytest.raises(StandInDeviceError, match=message):
                call()
        # float32: 16-byte rows are 4 elements, which CUDA takes
        qf, kf, vf = (x.float() for x in (q, k, v))
        fwd(qf, kf, vf, bias(torch.float32, rows=n, width=20), True)


# (V, L, B, tile, context-parallel chunks, packed documents). The last case has odd sizes: tiles
# of 6 positions, so piece (b) has 18 query rows and 18 keys, and piece (a) 6 or 12 keys: no
# multiple of 4 or 8, so a bias not padded to aligned rows or a log-sum-exp not padded to 32 rows
# is refused by the stand-in as by the CUDA kernel (`standin_device`).
DEVICE_CASES = {"views1": (1, 32, 4, None, False, False),
                "views2": (2, 32, 4, None, False, False),
                "context_parallel": (1, 32, 4, None, True, False),
                "odd_sizes_documents": (2, 18, 3, 6, False, True)}
# the CUDA kernel's dtypes, against float64: fp32 near its rounding, bf16 (8 bits of mantissa,
# the merge of the pieces in bf16) at a few of its roundings
DEVICE_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5),
                    torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", DEVICE_CASES)
def test_tiled_kernel_on_the_device_backend(case, dtype):
    """Off the CPU the tiled kernel runs its pieces through the memory-efficient attention ops
    (CUDA; here their math, refusing what CUDA refuses, see `standin_device`), in the dtypes that
    kernel takes: same outputs and gradients as the dense mask in float64 on the host, with
    grouped-query heads, a context-parallel rank's chunks against the gathered clean stream,
    packed documents."""
    from cascade_kernels import tiled
    from cascade_mega.diffusion.masks import AttentionLayout

    V, L, B, tile, cp, packed = DEVICE_CASES[case]
    h, g, d = 4, 2, 8
    docs = torch.tensor([[0] * 4 + [1] * 9 + [2] * (L - 13), [0] * 7 + [1] * (L - 7)]) \
        if packed else None
    layout = AttentionLayout("block_diffusion", L, B, V, documents=docs)
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    # inputs in the kernel's dtype; the reference takes exactly those values in float64
    q, k, v = (torch.randn(2, n, layout.total_len, d, dtype=torch.float64, generator=gen)
               .to(dtype) for n in (h, g, g))
    full = layout.dense()  # [S, S], or [b, 1, S, S] with documents
    rows = torch.arange(layout.total_len)
    if cp:  # rank 1 of a context-parallel group of 2
        split = layout.split_for_context(1, 2)
        rows = split.rows()
    rep = lambda x: x.repeat_interleave(h // g, 1)  # noqa: E731
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    s = (qr[:, :, rows] @ rep(kr).transpose(-1, -2)) / d ** 0.5
    ref = torch.softmax(s.masked_fill(~full[..., rows, :], float("-inf")), -1) @ rep(vr)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=gen).to(dtype)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad.double())
    with standin() as dev:
        qd, kd, vd = (x.to(dev).requires_grad_() for x in (q, k, v))
        documents = docs.to(dev) if packed else None
        if cp:
            clean = slice(V * L, (V + 1) * L)
            ck, cv = (x[:, :, clean].detach().clone().requires_grad_() for x in (kd, vd))
            held = rows.to(dev)
            out = tiled.block_diffusion_attention(
                qd[:, :, held], kd[:, :, held], vd[:, :, held], L, B, V, tile,
                chunks=split.chunks, num_chunks=split.num_chunks, clean_kv=(ck, cv),
                documents=documents)
        else:
            out = tiled.block_diffusion_attention(qd, kd, vd, L, B, V, tile, documents=documents)
        assert isinstance(out, Dev) and out.dtype == dtype
        out.backward(grad.to(dev))
        got = [x.grad.cpu() for x in (qd, kd, vd)]
        if cp:  # the gathered stream's gradient goes back to its rows (the reduce-scatter)
            got[1][:, :, clean] += ck.grad.cpu()
            got[2][:, :, clean] += cv.grad.cpu()
        out = out.cpu()
    tol = DEVICE_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, **tol)
    for a, e in zip(got, ref_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, **tol)


def test_schedule_search_on_the_device(megatron, tmp_path):
    """The search's forwards, variances and single read-back on the stand-in device: the same
    variances and choice as on the host."""
    from cascade_mega.train.callbacks import schedule_search
    from cascade_mega.train.trainer import Trainer

    extra = ["diffusion.schedule_search.interval=1", "diffusion.schedule_search.batches=1",
             "diffusion.schedule_search.draws=2"]
    host = schedule_search.search(Trainer(_cfg(tmp_path, "host", extra), []).setup(), 1)
    with standin():
        on_device = schedule_search.search(Trainer(_cfg(tmp_path, "dev", extra), []).setup(), 1)
    _close(on_device, host)


def test_initial_weights_are_the_same_at_tp1_and_tp2_on_the_device(megatron, tmp_path,
                                                                   monkeypatch):
    """One seed, the same initial weights on the device at TP = 2 (two ranks, saved as a
    checkpoint) and at TP = 1 (here), and on the host: weights are drawn whole on the host and
    split on every device, which a GPU's model config says too (megatron-core's device path
    draws each shard from its own stream: the weights would change with the layout)."""
    import subprocess
    import sys

    from helpers import MASK_ID, ROOT, VOCAB, tiny_cfg

    from cascade_mega.model import gpt
    from cascade_mega.runtime import device
    from cascade_mega import checkpoint

    root = tmp_path / "tp2"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "tests/init_at_tp2.py", str(root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = tiny_cfg("model.num_query_groups=2", "model.qk_norm=true",
                   "model.time_conditioning=true", f"run_dir={tmp_path / 'tp1'}")
    with standin():
        torch.manual_seed(0)
        tp1 = {k: v.elem for k, v in gpt.build_model(cfg, VOCAB, [MASK_ID]).state_dict().items()
               if isinstance(v, Dev)}
    loaded = gpt.build_model(cfg, VOCAB, [MASK_ID])
    checkpoint.load(checkpoint.latest(str(root)), [loaded], None, None)
    torch.manual_seed(0)
    host = gpt.build_model(cfg, VOCAB, [MASK_ID]).state_dict()
    assert tp1.keys() == {k for k in loaded.state_dict() if not k.endswith("_extra_state")}
    for name, weight in tp1.items():
        assert torch.equal(weight, loaded.state_dict()[name]), name
        assert torch.equal(weight, host[name]), name
    monkeypatch.setattr(device, "on_gpu", lambda: True)
    assert gpt.transformer_config(cfg, torch.bfloat16).use_cpu_initialization
