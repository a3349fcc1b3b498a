"""Make megatron-core run on a machine without CUDA.

megatron-core assumes CUDA in a handful of places: `torch.cuda.current_device()` as a device,
literal `device="cuda"` tensors, CUDA streams/events/synchronize, and the CUDA RNG tracker.
Rather than fork megatron code, every loaded `megatron.core` module gets a `torch` proxy whose
`torch.cuda` answers with CPU equivalents and whose tensor factories map a CUDA device to the process's device (the CPU here).
Only megatron's view of torch changes; torch itself and the project's code are untouched, except
two Tensor methods: `cuda()` moves to the process's device (`runtime/device.py`: the CPU, so the
identity; the device tests' stand-in there), and the
no-argument `type()` names CPU tensors as CUDA ones ('torch.cuda.FloatTensor'), which megatron's
optimizer and grad clipping assert.

`apply()` is a no-op when CUDA is available, and idempotent. It also replaces megatron's
fallback gradient-norm kernel (used without apex) with one that sums in float64: fp32 `torch.norm`
on the CPU is too inexact for layouts to agree; and the MoE token dispatcher's token counts come
to the host (its split sizes as numpy arrays), as megatron-core's GPU path hands them to NCCL.
Each behaviour is covered by `tests/test_cpu_compat.py`.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch

from cascade_mega.runtime import device as _device

_APPLIED = False

# Modules the trainer uses; importing them before patching means their `torch` gets the proxy.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.attention",
    "megatron.core.distributed",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.datasets.gpt_dataset",
    "megatron.core.datasets.blended_megatron_dataset_builder",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_layer",
)

_FACTORIES = frozenset(
    "tensor zeros ones empty full arange randn rand randint zeros_like ones_like empty_like "
    "full_like as_tensor linspace eye".split()
)


def _cpu_device(device):
    """Map any CUDA device spelling (int, 'cuda', 'cuda:1', torch.device) to the process's device
    (`runtime/device.py`: the CPU, or the stand-in device of the device tests)."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return _device.current()
    if isinstance(device, str) and device.startswith("cuda"):
        return _device.current()
    if isinstance(device, torch.device) and device.type == "cuda":
        return _device.current()
    return device


class _FakeStream:
    """Stands in for a CUDA stream/event: on the CPU every operation has completed when its call
    returns, so ordering (`wait_stream`, `wait_event`, `wait`) and waiting (`synchronize`) have
    nothing to do. It has what megatron-core calls on streams and events and no more: no
    `query()` or `elapsed_time()` (nothing in megatron-core calls them; a made-up answer, such as
    a zero timing, would be worse than an AttributeError)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _FakeStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _make_cuda_shim() -> types.SimpleNamespace:
    real = torch.cuda
    shim = types.SimpleNamespace()
    # Everything we do not override falls back to the real torch.cuda (e.g. is_available()).
    for name in dir(real):
        if not name.startswith("__"):
            setattr(shim, name, getattr(real, name))
    shim.current_device = lambda: _device.current()
    shim.device_count = lambda: 0
    shim.set_device = lambda *a, **k: None
    shim.synchronize = lambda *a, **k: None
    shim.empty_cache = lambda: None
    shim.Stream = _FakeStream
    shim.Event = _FakeStream
    shim.current_stream = lambda *a, **k: _FakeStream()
    shim.default_stream = lambda *a, **k: _FakeStream()
    shim.stream = lambda *a, **k: contextlib.nullcontext()
    shim.set_stream = lambda *a, **k: None
    shim.memory_stats = lambda *a, **k: {}
    shim.max_memory_allocated = lambda *a, **k: 0
    shim.memory_allocated = lambda *a, **k: 0
    # The "CUDA" RNG is the CPU generator: the RNG tracker then forks CPU states.
    shim.get_rng_state = lambda *a, **k: torch.get_rng_state()
    shim.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    shim.manual_seed = lambda seed: torch.manual_seed(seed)
    return shim


class _TorchForMegatron(types.ModuleType):
    """`torch` as megatron-core modules see it on a CPU-only machine."""

    def __init__(self, shim):
        super().__init__("torch")
        self.__dict__["cuda"] = shim

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, __f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)  # no pinned memory without an accelerator
                return __f(*args, **kwargs)

            return factory
        return attr


def _rng_state_getter(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _rng_state_setter(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tensor_to_cpu(self, device=None, non_blocking=False, **kwargs):
    return self.to(_device.current())


_REAL_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    # megatron asserts `param.type() == 'torch.cuda.FloatTensor'` (optimizer, grad clipping).
    if dtype is None and not kwargs:
        name = _REAL_TYPE(self)  # torch.FloatTensor (CPU), torch.meta.FloatTensor (stand-in)
        return name if self.device.type == "cuda" else "torch.cuda." + name.rsplit(".", 1)[-1]
    return _REAL_TYPE(self, dtype, non_blocking, **kwargs)


def _accurate_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's fallback l2 norm (no apex/TE) uses fp32 `torch.norm`, which on the CPU is off by
    ~1e-5 relative for large tensors, so the reported grad norm (and the clip factor) depended on
    how tensor parallelism splits the weights. Sum squares in float64 instead."""
    grads = tensor_lists[0]
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for t in grads:
        total += t.detach().double().square().sum()
    return torch.sqrt(total).float().reshape(1), None


def _split_sizes_to_host(tensor, as_numpy=False, record_stream=False):
    """megatron-core's MoE token dispatcher moves its token counts off the GPU, the all-to-all
    split sizes as numpy arrays; its own version moves CUDA tensors only, and on the CPU the
    split sizes would stay tensors, which gloo's `all_to_all_single` refuses. Here every tensor
    comes to the host (a device test's stand-in device included), as a numpy array if asked."""
    if torch.is_tensor(tensor):
        tensor = tensor.detach().to("cpu")
        return tensor.numpy() if as_numpy else tensor
    return tensor


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply() -> bool:
    """Patch megatron-core for CPU if CUDA is absent. Returns True when patches are active."""
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        _patch_loaded_modules()  # modules imported since the last call get the proxy too
        return True
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    global _PROXY
    _PROXY = _TorchForMegatron(_make_cuda_shim())
    _patch_loaded_modules()
    random = sys.modules["megatron.core.tensor_parallel.random"]
    random._get_cuda_rng_state = _rng_state_getter
    random._set_cuda_rng_state = _rng_state_setter
    torch.Tensor.cuda = _tensor_to_cpu
    torch.Tensor.type = _cuda_type_name
    clip_grads = sys.modules["megatron.core.optimizer.clip_grads"]
    if clip_grads.l2_norm_impl.__name__ == "local_multi_tensor_l2_norm":
        clip_grads.l2_norm_impl = _accurate_l2_norm
    for name in ("moe_utils", "token_dispatcher"):
        sys.modules[f"megatron.core.transformer.moe.{name}"].maybe_move_tensor_to_cpu = \
            _split_sizes_to_host
    _APPLIED = True
    return True


_PROXY = None


def _patch_loaded_modules() -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _PROXY
