"""A stand-in accelerator for the CPU: real CPU arithmetic, but its tensors are not host tensors.

These machines have no GPU, and the mistakes a GPU punishes (a tensor created on the host and fed
to a model on the device) pass silently on the CPU, where host and device are one. Under
`standin()` the project's device (`runtime/device.py`) is a device that is not the host:

- `Dev` is a tensor subclass that holds a real CPU tensor and reports the device `meta` (torch
  knows it everywhere and it has a no-op device guard; CUDA, on a CPU-only build, crashes in
  C++). Every aten op on a `Dev` unwraps, computes on the CPU and wraps the results, and **raises
  when a `Dev` meets a host tensor of one element or more** (0-dim host tensors are scalars, which
  CUDA accepts too). That is the mistake CUDA reports as "Expected all tensors to be on the same
  device".
- A dispatch mode turns what creates device tensors into `Dev`s: factories given the stand-in
  device (`torch.zeros(..., device=device.current())`), `.to(device)` / `.cuda()` of a host
  tensor. Factories without a device stay host tensors, as they do on a GPU host.
- megatron-core's view of CUDA (`runtime/cpu_compat.py`) reports the stand-in as the current device,
  so megatron's own `device=torch.cuda.current_device()` tensors are device tensors too.
- Two things cannot run on it and are stood in for, saying so: `F.scaled_dot_product_attention`
  (a composite that builds its masks in C++ where the mode cannot see them: it runs here as the
  same math in Python ops on the `Dev`s) and the gloo collectives, which the CPU backend cannot
  read from a subclass (they run on the wrapped CPU tensors in place; one process only).
- CUDA-only fused ops the project calls on a CUDA device (the tiled kernel's memory-efficient
  attention pieces) run here as their math, so their calling convention is exercised on CPU.

A real mismatch raises `StandInDeviceError` naming the op and the host tensor's shape.
`count_syncs()` counts what would stall the host on a GPU (reads of device values, blocking
copies to the device).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

STANDIN = torch.device("meta")


class StandInDeviceError(RuntimeError):
    pass


def _is_standin(d) -> bool:
    return isinstance(d, (str, torch.device)) and torch.device(d).type == STANDIN.type


def _unwrap(x):
    return x.elem if isinstance(x, Dev) else x


def _wrap(x):
    return Dev(x) if isinstance(x, torch.Tensor) and not isinstance(x, Dev) else x


def _host_device(x):
    return torch.device("cpu") if isinstance(x, torch.device) and _is_standin(x) else x


class Dev(torch.Tensor):
    """A device tensor of the stand-in: CPU data inside, the stand-in device outside."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=STANDIN, requires_grad=elem.requires_grad,
            layout=elem.layout)
        r.elem = elem
        return r

    def __repr__(self, **_):
        return f"Dev({self.elem!r})"

    # `t.data = other` swaps the tensor behind a Python object (megatron's viewless tensors and
    # gradient buffers do it): the wrapped CPU tensor must follow
    @property
    def data(self):
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value):
        if not isinstance(value, Dev):
            raise StandInDeviceError(f"a device tensor's .data set to a host tensor "
                                     f"{tuple(value.shape)} (on a GPU it would move to the host)")
        torch.Tensor.data.__set__(self, value)
        self.elem = value.elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and not isinstance(args[1], Dev):
            _SYNCS.blocking_copies += not kwargs.get("non_blocking", False)  # host -> device
            args[0].elem.copy_(args[1], **kwargs)  # a copy between devices is legal on CUDA too
            return args[0]
        flat, _ = tree_flatten((args, kwargs))
        host = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, Dev)
                and t.dim() > 0]
        if host:
            raise StandInDeviceError(
                f"{func}: a host tensor {tuple(host[0].shape)} {host[0].dtype} meets a device "
                "tensor (on a GPU: 'Expected all tensors to be on the same device')")
        if func in _CUDA_ONLY:
            return tree_map(_wrap, _CUDA_ONLY[func](*tree_map(_unwrap, args),
                                                    **tree_map(_unwrap, kwargs)))
        if func is torch.ops.aten._local_scalar_dense.default:
            _SYNCS.reads += 1  # .item(), float(), bool() of a device tensor
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None and \
                torch.device(kwargs["device"]).type == "cpu":
            _SYNCS.reads += 1  # device -> host
            return func(*tree_map(_unwrap, args), **kwargs)
        out = func(*tree_map(_unwrap, args), **tree_map(_host_device, tree_map(_unwrap, kwargs)))
        return tree_map(_wrap, out)


# ----------------------------------------------------------------------- host synchronisations
@dataclass
class Syncs:
    """What would stall the host on a GPU: reads of device values (`.item()`, `.cpu()`) and
    blocking host-to-device copies (a Python number or a pageable tensor copied synchronously)."""

    reads: int = 0
    blocking_copies: int = 0


_SYNCS = Syncs()


@contextlib.contextmanager
def count_syncs():
    global _SYNCS
    saved, _SYNCS = _SYNCS, Syncs()
    try:
        yield _SYNCS
    finally:
        _SYNCS = saved


# ----------------------------------------------------------------------- CUDA-only ops as math
def _efficient_fwd(q, k, v, bias, compute_lse, dropout_p=0.0, is_causal=False, *, scale=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    if bias is not None:
        s = s + bias.double()
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.softmax(s, -1) @ v.double()).to(q.dtype)
    out = out.transpose(1, 2).contiguous().transpose(1, 2)  # laid out [b, s, h, d], as CUDA's
    pad = -q.shape[2] % 32  # the CUDA kernel pads the log-sum-exp rows to a multiple of 32
    lse = F.pad(lse, (0, pad), value=float("inf"))  # float32, as CUDA's (float64 inputs: kept)
    lse = lse if q.dtype == torch.float64 else lse.float()
    zero = torch.zeros((), dtype=torch.int64)
    return out, lse, zero, zero


def _efficient_bwd(grad, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask,
                   is_causal=False, *, scale=None):
    if not out.transpose(1, 2).is_contiguous():  # what the CUDA kernel assumes, unchecked
        raise StandInDeviceError("the memory-efficient attention backward reads `out` as its "
                                 "forward lays it out ([b, s, h, d] in memory); got strides "
                                 f"{out.stride()}")
    scale = scale or 1 / math.sqrt(q.shape[-1])
    qd, kd, vd = (x.double() for x in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    p = torch.exp(s - lse[..., :q.shape[2], None].double())
    g = grad.double()
    dv = p.transpose(-1, -2) @ g
    dp = g @ vd.transpose(-1, -2)
    ds = p * (dp - (g * out.double()).sum(-1, keepdim=True))
    dq, dk = (ds @ kd) * scale, (ds.transpose(-1, -2) @ qd) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


_CUDA_ONLY = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default: _efficient_fwd,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward.default: _efficient_bwd,
}


def _sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """F.scaled_dot_product_attention as Python ops (they dispatch through `Dev`)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    s = (query @ key.transpose(-1, -2)) * (scale or 1 / math.sqrt(query.shape[-1]))
    if is_causal:
        L, S = query.shape[-2], key.shape[-2]
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else s + attn_mask
    return torch.softmax(s.float(), -1).to(query.dtype) @ value


# ----------------------------------------------------------------------- creation of device tensors
class _Factories(TorchDispatchMode):
    """Factories given the stand-in device, and copies of host tensors to it, make `Dev`s. At the
    dispatch level, so it also holds inside backward and autograd functions."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_standin(kwargs.get("device")) and not any(
                isinstance(t, Dev) for t in tree_flatten(args)[0]):
            if func is torch.ops.aten._to_copy.default:  # host -> device
                _SYNCS.blocking_copies += not kwargs.get("non_blocking", False)
            kwargs = {**kwargs, "device": torch.device("cpu")}
            kwargs.pop("pin_memory", None)
            return tree_map(_wrap, func(*args, **kwargs))
        return func(*args, **kwargs)


class _Composites(TorchFunctionMode):
    """`F.scaled_dot_product_attention` on `Dev`s as Python math (see the module docstring), and
    `torch.tensor(data, device=...)`, which builds its tensor below the dispatcher's modes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _is_standin(kwargs.get("device")):
            _SYNCS.blocking_copies += 1  # data from the host, copied before it returns
            return Dev(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        if func is F.scaled_dot_product_attention and any(
                isinstance(t, Dev) for t in tree_flatten((args, kwargs))[0]):
            return _sdpa_math(*args, **kwargs)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------- collectives (one process)
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor",
                "_all_gather_base", "_reduce_scatter_base", "all_gather", "barrier")


def _unwrapped(fn):
    def call(*args, **kwargs):
        return fn(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))

    return call


@contextlib.contextmanager
def standin():
    """Run the block with the project's device set to the stand-in (see the module docstring)."""
    from cascade_mega.runtime import cpu_compat, device

    assert not torch.cuda.is_available(), "the stand-in is for CPU hosts (a GPU host has the real)"
    cpu_compat.apply()
    saved_device = device.current()
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
    device.use(STANDIN)
    for name, fn in saved.items():
        setattr(dist, name, _unwrapped(fn))
    try:
        with _Composites(), _Factories():
            yield STANDIN
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        device.use(saved_device)
