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
  attention pieces) run here as their math, so their calling convention is exercised on CPU, and
  they refuse what the real op refuses on an A100/H100/H200 (the `Sm80` kernels): dtypes other
  than float32/float16/bfloat16, a bias of another dtype than the query's or not exactly
  [b, h, q_len, k_len] (expanded views are fine), a bias whose rows are not 16-byte aligned,
  a log-sum-exp whose head/batch strides are not 8-aligned; and what its kernel assumes without
  checking: key/value/out in the query's dtype, `out` laid out as its forward returns it, the
  log-sum-exp rows padded to a multiple of 32, as the forward returns them. Each check names
  the check of PyTorch's CUDA source it mirrors.

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
# The memory-efficient attention ops refuse here what they refuse on a GPU of compute capability
# 8.x or 9.x (A100, H100, H200: `dispatch_cutlassF` takes the `Sm80` kernels), and what their
# kernels assume without checking (there they would read the wrong memory). Each check names the
# check of PyTorch's CUDA source it mirrors; the sources (pytorch/pytorch main, under
# aten/src/ATen/native/transformers/cuda/):
#   attention.cu            `_efficient_attention_forward` (shape, dtype and bias checks, the
#                           kernel selection of `launchKernel`, the log-sum-exp it allocates)
#   attention_backward.cu   `_efficient_attention_backward` (the same for the backward)
#   mem_eff_attention/kernel_forward.h, kernel_backward.h   `check_supported` (alignments)
#   mem_eff_attention/gemm_kernel_utils.h   DISPATCH_TYPES, DefaultGemmType,
#                           CHECK_NOSPARSE_LASTCONTIGUOUS_CUDA, CHECK_ALIGNED_PTR
#   mem_eff_attention/kernels/cutlassF.h   (on Sm80 only the `aligned` forward kernels exist)
#   mem_eff_attention/gemm/mma_from_smem.h   `accumApplyLSEToSmem` (how the backward reads the
#                           log-sum-exp)
# The sdpa ops (`_scaled_dot_product_efficient_attention[_backward]`) only transpose [b, h, s, d]
# to the kernels' [b, s, h, d] and pass everything on; the checks below are written in the sdpa
# ops' [b, h, s, d] terms (the kernels' strideM is stride(2) here, strideH stride(1)).

_EFFICIENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LSE_ROWS = 32  # kernel_forward.h `kAlignLSE = 32; // block size of backward`


def _refuse(ok: bool, problem: str):
    if not ok:
        raise StandInDeviceError(f"memory-efficient attention: {problem}")


def _forward_alignment(dtype) -> int:
    """Elements: 16 bytes. The forward's kAlignmentQ/kAlignmentK (kernel_forward.h
    `MM0::kAlignmentA = kIsAligned ? DefaultConfig::kAlignmentA : ...`), and on Sm80 only the
    aligned kernels exist (cutlassF.h), whose DefaultGemmConfiguration<OpClassTensorOp, Sm80>
    has kAlignmentA = 128 / sizeof_bits: 4 for float32, 8 for float16/bfloat16."""
    return 16 // dtype.itemsize


_BACKWARD_ALIGNMENT = 4  # kernel_backward.h `kMinimumAlignment = GemmType::kMinimumAlignment`,
# gemm_kernel_utils.h DefaultGemmType on Sm80: 4 for float32 and for float16/bfloat16


def _byte_offset(x) -> int:
    # CHECK_ALIGNED_PTR(PTR, ALIGNMENT) tests `uint64_t(PTR) % ALIGNMENT` (the byte address modulo
    # the alignment in elements); a CUDA allocation starts 512-byte aligned, so the address
    # modulo it is the storage offset's, in bytes
    return x.storage_offset() * x.element_size()


def _check_qkv(q, k, v, align_qk: int, align_v: int, op: str):
    # attention.cu / attention_backward.cu: TORCH_CHECK(query.dim() == 4), the batch, sequence,
    # head-count and head-dim equalities
    _refuse(q.dim() == k.dim() == v.dim() == 4,
            f"query, key, value must be 4-D [b, h, s, d]; got {q.dim()}, {k.dim()}, {v.dim()}")
    b, h, _, d = q.shape
    _refuse(k.shape[0] == v.shape[0] == b, f"batch sizes differ: {q.shape}, {k.shape}, {v.shape}")
    _refuse(k.shape[1] == v.shape[1] == h, f"as many key/value heads as query heads (grouped "
            f"K/V repeated) expected: {q.shape}, {k.shape}, {v.shape}")
    _refuse(k.shape[2] == v.shape[2], f"key and value lengths differ: {k.shape}, {v.shape}")
    _refuse(k.shape[3] == d, f"query and key head dims differ: {q.shape}, {k.shape}")
    # gemm_kernel_utils.h DISPATCH_TYPES (on the query's dtype): "Only fp32, half & bf16
    # supported at the moment"
    _refuse(q.dtype in _EFFICIENT_DTYPES,
            f"query dtype {q.dtype}: only fp32, half & bf16 supported (the CUDA kernel's dtypes)")
    # unchecked there: the kernel reads key and value as the query's dtype
    # (`(const scalar_t*)key.const_data_ptr()`), so another dtype is read as garbage
    _refuse(k.dtype == q.dtype and v.dtype == q.dtype,
            f"key/value dtypes {k.dtype}/{v.dtype} differ from the query's {q.dtype} (the CUDA "
            "kernel reads them as the query's dtype, unchecked)")
    for name, x, align in (("query", q, align_qk), ("key", k, align_qk), ("value", v, align_v)):
        # CHECK_NOSPARSE_LASTCONTIGUOUS_CUDA: "last dimension must be contiguous"
        _refuse(x.stride(-1) == 1 or x.size(-1) == 1,
                f"{name}: last dimension must be contiguous; strides {x.stride()}")
        # launchKernel's alignment test (`query.stride(2) % Kernel::kAlignmentQ`, the head
        # stride): no kernel of the Sm80 set takes it ("cutlass{F,B}: no kernel found to launch!")
        _refuse(x.stride(1) % align == 0,
                f"{name}'s head stride {x.stride(1)} is not a multiple of {align}: no {op} kernel "
                "found to launch")
        # check_supported: CHECK_ALIGNED_PTR and "{name} is not correctly aligned (strideM)" (and
        # strideB, checked by the backward's)
        _refuse(_byte_offset(x) % align == 0, f"{name}_ptr is not correctly aligned")
        _refuse(x.stride(2) % align == 0,
                f"{name} is not correctly aligned (strideM): stride(2) = {x.stride(2)}, should be "
                f"a multiple of {align}")
        if op == "backward":
            _refuse(b <= 1 or x.stride(0) % align == 0,
                    f"{name} is not correctly aligned (strideB): stride(0) = {x.stride(0)}")


def _check_bias(bias, q, k, align: int):
    if bias is None:
        return
    # "invalid dtype for bias - should match query's dtype"
    _refuse(bias.dtype == q.dtype,
            f"invalid dtype for bias - should match query's dtype ({bias.dtype} vs {q.dtype})")
    # "Bias expected in BMHK format" (4-D) and "attn_bias: wrong shape (batch / head / seqlenQ /
    # seqlenKV dimension)": the sizes must be [b, h, q_len, k_len] exactly, no broadcasting (an
    # expanded view, stride 0, is what a broadcast bias takes)
    _refuse(bias.dim() == 4, f"Bias expected in BMHK format (4-D); got {tuple(bias.shape)}")
    want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    _refuse(tuple(bias.shape) == want,
            f"attn_bias: wrong shape {tuple(bias.shape)}, expected [b, h, q_len, k_len] = {want} "
            "(expand a broadcast bias)")
    # CHECK_NOSPARSE_LASTCONTIGUOUS_CUDA(*bias) and "attn_bias: wrong alignment (last dimension
    # must be contiguous)" (bias->stride(3) == 1)
    _refuse(bias.stride(3) == 1, "attn_bias: wrong alignment (last dimension must be "
            f"contiguous); strides {bias.stride()}")
    # check_supported: CHECK_ALIGNED_PTR(attn_bias_ptr) and "attn_bias is not correctly aligned
    # (strideB / strideH / strideM)": each stride a multiple of the alignment, unless that
    # dimension has one element (num_batches / num_heads / num_queries <= 1)
    _refuse(_byte_offset(bias) % align == 0, "attn_bias_ptr is not correctly aligned")
    for dim, name in ((0, "strideB"), (1, "strideH"), (2, "strideM")):
        _refuse(bias.shape[dim] <= 1 or bias.stride(dim) % align == 0,
                f"attn_bias is not correctly aligned ({name}). attn_bias.stride({dim}) = "
                f"{bias.stride(dim)}, and should be a multiple of {align} (a {bias.dtype} "
                "bias: a view into padded memory)")


def _efficient_fwd(q, k, v, bias, compute_lse, dropout_p=0.0, is_causal=False, *, scale=None):
    align = _forward_alignment(q.dtype) if q.dtype in _EFFICIENT_DTYPES else 1
    _check_qkv(q, k, v, align, 1, "forward")  # kernel_forward.h: kAlignmentV = 1
    _check_bias(bias, q, k, align)  # kernel_forward.h: the bias's strides % kAlignmentQ
    s = (q.double() @ k.double().transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    if bias is not None:
        s = s + bias.double()
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.softmax(s, -1) @ v.double()).to(q.dtype)
    out = out.transpose(1, 2).contiguous().transpose(1, 2)  # laid out [b, s, h, d], as CUDA's
    # as the CUDA op: float32 [b, h, ceil(q_len / 32) * 32], the rows past q_len +inf
    # (attention.cu: `ceil_div(max_seqlen_q, kAlignLSE) * kAlignLSE`, 0 without compute_lse)
    pad = -q.shape[2] % _LSE_ROWS
    lse = F.pad(lse, (0, pad), value=float("inf")).float() if compute_lse else \
        lse.new_empty(*lse.shape[:2], 0, dtype=torch.float32)
    zero = torch.zeros((), dtype=torch.int64)
    return out, lse, zero, zero


def _efficient_bwd(grad, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask,
                   is_causal=False, *, scale=None):
    _check_qkv(q, k, v, _BACKWARD_ALIGNMENT, _BACKWARD_ALIGNMENT, "backward")
    _check_bias(bias, q, k, _BACKWARD_ALIGNMENT)  # kernel_backward.h: % kMinimumAlignment
    b, h, m, _ = q.shape
    # attention_backward.cu: grad_out's batch, length, heads and value head dim equal the
    # query's / value's (it is made contiguous there, any layout goes)
    _refuse(tuple(grad.shape) == (b, h, m, v.shape[3]),
            f"grad_out {tuple(grad.shape)} does not match query {tuple(q.shape)}, value "
            f"{tuple(v.shape)}")
    # unchecked there: `out` and `grad_out` are read as the query's dtype
    _refuse(out.dtype == q.dtype and grad.dtype == q.dtype,
            f"out/grad_out dtypes {out.dtype}/{grad.dtype} differ from the query's {q.dtype} (read "
            "as the query's dtype, unchecked)")
    # kernel_backward.h check_supported: CHECK_ALIGNED_PTR(p.output_ptr, kMinimumAlignment)
    _refuse(_byte_offset(out) % _BACKWARD_ALIGNMENT == 0, "output_ptr is not correctly aligned")
    if not out.transpose(1, 2).is_contiguous():  # what the CUDA kernel assumes, unchecked
        raise StandInDeviceError("the memory-efficient attention backward reads `out` as its "
                                 "forward lays it out ([b, s, h, d] in memory); got strides "
                                 f"{out.stride()}")
    # The log-sum-exp: the forward returns float32 [b, h, ceil(q_len / 32) * 32], the rows past
    # q_len +inf (kernel_forward.h: "To make the backward easier, we pad logsumexp with `inf` /
    # this avoids a few bound checks"). The backward reads it as float (`lse_scalar_t`) at
    # b * stride(0) + h * stride(1) + i, and from each block of queries ceil(rows / 32) * 32
    # entries (mma_from_smem.h `accumApplyLSEToSmem`: extent `ceil_div(lse_extents, kAlignLSE) *
    # kAlignLSE`), without a check: a shorter row is read past its end. Checked there only:
    # kernel_backward.h check_supported "LSE is not correctly aligned (strideH)" and "(strideB)".
    padded = -(-m // _LSE_ROWS) * _LSE_ROWS
    _refuse(lse.dtype == torch.float32 and lse.dim() == 3 and tuple(lse.shape[:2]) == (b, h),
            f"logsumexp must be the forward's float32 [b, h, padded q_len]; got {lse.dtype} "
            f"{tuple(lse.shape)}")
    _refuse(h <= 1 or lse.stride(1) % 8 == 0,
            f"LSE is not correctly aligned (strideH): stride(1) = {lse.stride(1)}, should be a "
            "multiple of 8")
    _refuse(b <= 1 or lse.stride(0) % 8 == 0,
            f"LSE is not correctly aligned (strideB): stride(0) = {lse.stride(0)}, should be a "
            "multiple of 8")
    _refuse(lse.shape[2] >= padded and lse.stride(2) == 1,
            f"logsumexp rows must hold ceil(q_len / 32) * 32 = {padded} consecutive entries, as "
            f"the forward pads them (the CUDA backward reads that many, unchecked); got shape "
            f"{tuple(lse.shape)}, strides {lse.stride()}")
    scale = scale or 1 / math.sqrt(q.shape[-1])
    qd, kd, vd = (x.double() for x in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    p = torch.exp(s - lse[..., :m, None].double())
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
