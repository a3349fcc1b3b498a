"""Each behaviour the CPU-compatibility layer patches into megatron-core, checked directly.
The layer applies only where CUDA is absent: on a GPU host these tests skip."""

import sys

import pytest
import torch

from cascade_mega.runtime import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU-compatibility layer applies only without CUDA")


def _megatron_torch():
    return sys.modules["megatron.core.parallel_state"].torch


def test_applied_without_cuda(megatron):
    assert not torch.cuda.is_available()
    assert cpu_compat.apply() is True
    assert _megatron_torch() is not torch  # megatron sees the proxy, the project sees torch


def test_current_device_and_literal_cuda_tensors(megatron):
    mt = _megatron_torch()
    assert mt.cuda.current_device() == torch.device("cpu")
    for device in ("cuda", "cuda:0", 0, torch.device("cuda")):
        x = mt.zeros(3, device=device)
        assert x.device.type == "cpu"
    assert mt.tensor([1.0], device="cuda").device.type == "cpu"
    assert mt.empty(2, device=mt.cuda.current_device()).device.type == "cpu"


def test_streams_events_and_synchronize_run_for_megatron_only(megatron):
    """megatron-core's stream calls (DDP's communication stream, the grad buffer's wait_stream,
    stream context and wait_event) run on the stand-ins, the work in order; the project's own
    torch.cuda is untouched: on this CUDA-less host it still refuses each of them."""
    mt = _megatron_torch()
    side = mt.cuda.Stream(device=mt.cuda.current_device())  # as megatron's DDP builds it
    current = mt.cuda.current_stream()
    x = torch.arange(4.0)
    side.wait_stream(current)
    with mt.cuda.stream(side):
        y = x * 2
    current.wait_stream(side)
    event = side.record_event()
    current.wait_event(event)
    event.synchronize()
    mt.cuda.synchronize()
    assert y.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert not hasattr(event, "elapsed_time")  # no made-up timings
    with pytest.raises((AssertionError, RuntimeError)):  # no CUDA: real torch.cuda refuses
        torch.cuda.synchronize()
    with pytest.raises(RuntimeError):
        torch.cuda.Stream()


def test_tensor_cuda_and_type(megatron):
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64  # conversion form untouched


def test_rng_tracker_forks_cpu_state(megatron):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(77)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream restored
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advanced
    tensor_parallel.model_parallel_cuda_manual_seed(77)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # reseeding reproduces it


def test_rng_state_helpers_for_recompute(megatron):
    random = sys.modules["megatron.core.tensor_parallel.random"]
    state = random._get_cuda_rng_state()
    x = torch.rand(3)
    random._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), x)


def test_grad_clipping_runs_on_cpu(megatron):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10) * 100
    norm = float(p.grad.norm())
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=norm)
    assert abs(float(p.grad.norm()) - 1.0) < 1e-3


def test_grad_norm_is_exact_on_cpu(megatron):
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(8192 * 64, generator=g) * 1e-2, torch.randn(300, generator=g)]
    grads[0][::7] *= 50
    want = float(torch.sqrt(sum(x.double().square().sum() for x in grads)))
    got = get_grad_norm_fp32(grads)
    assert abs(got - want) < 1e-6 * want, (got, want)


def test_moe_token_counts_come_to_the_host_as_the_gpu_path_gives_them(megatron):
    """The all-to-all dispatcher's split sizes arrive as numpy arrays (gloo's all_to_all_single
    refuses tensors there); its other counts as host tensors."""
    import numpy as np

    dispatcher = sys.modules["megatron.core.transformer.moe.token_dispatcher"]
    counts = torch.tensor([3, 5])
    splits = dispatcher.maybe_move_tensor_to_cpu(counts, as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [3, 5]
    kept = dispatcher.maybe_move_tensor_to_cpu(counts)
    assert torch.is_tensor(kept) and kept.device.type == "cpu"
