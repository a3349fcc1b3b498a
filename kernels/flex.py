"""FlexAttention for every layout: the mask function is the layout's own
(`AttentionLayout.mask_fn`), restricted to each document when the batch packs documents.

FlexAttention skips fully masked tiles in forward and backward. The block mask is built once per
(layout, device); with documents it changes with every micro-batch, so it is built once per
micro-batch and kept on the layout object, which every layer of the forward receives (not once
per layer). Decoding (`inference/kv_cache.py`, when `model.attention_kernel=flex` names it)
builds one per forward.

Compilation. One compiled callable, `torch.compile(flex_attention, dynamic=False)` (uncompiled,
flex materialises the whole score matrix in fp32), whose compiles are counted (`compiles()`)
and bounded by construction. Dynamo compiles again for each new signature: the shapes of q/k/v,
their dtype, the grad mode, and the mask function's code and Python constants. So:
- a document mask is a tensor the mask function reads: a new one each micro-batch is not a new
  signature; the block size is a constant: each block size of `diffusion.block_size_schedule`
  is one signature per grad mode;
- decoding pads its rows to a bucket (`decode_rows`: 128, the kernel's own tile, or the next
  power of two for a long prefill) and attends the whole preallocated cache, whose unused part
  the block mask skips: its shapes do not grow with the decoded length.
A run compiles at most 2 x (block sizes) x (with / without documents) signatures for training and
evaluation (evaluation runs at the decoding block size, so it adds one per kind of mask), plus
one per decoding row bucket and dtype. Dynamo's limit is raised to cover that deliberately, and
going past it is an error naming the cause, never an uncompiled fallback
(`runtime/compilation.py`).

CPU: the compiled forward works, the backward does not exist there; a forward that needs
gradients on the CPU runs the tiled kernel instead, with one warning (`model/attention.py`).
"""

from __future__ import annotations

import collections
import functools

import torch

_COMPILES: collections.Counter = collections.Counter()


class RecompileLimit(RuntimeError):
    """FlexAttention was asked for more signatures than Dynamo's recompile limit."""


def compiles(name: str = "flex_attention") -> int:
    """How many times this process compiled `name` (a graph handed to the compiler)."""
    return _COMPILES[name]


def _counted(name: str):
    """Inductor, counting each graph it is given under `name`."""
    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        _COMPILES[name] += 1
        return compile_fx(gm, example_inputs)

    return backend


def mask_mod(layout, documents=None):
    """(b, h, q, kv) -> may attend, over the rows of the whole layout; with `documents` ([b, L]
    document ids of packed sequences) only within a document."""
    allowed, L = layout.mask_fn(), layout.seq_len
    if documents is None:
        return lambda b, h, q, kv: allowed(q, kv)
    return lambda b, h, q, kv: allowed(q, kv) & (documents[b, q % L] == documents[b, kv % L])


def create(fn, batch, q_len: int, kv_len: int, device) -> "BlockMask":  # noqa: F821
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(fn, batch, None, q_len, kv_len, device=str(device))


@functools.lru_cache(maxsize=16)
def _static_block_mask(layout, device: str):
    n = layout.total_len
    return create(mask_mod(layout), None, n, n, device)


def block_mask(layout, device: torch.device):
    if layout.documents is None:
        return _static_block_mask(layout, str(device))

    def build():
        documents, n = layout.documents.to(device), layout.total_len
        return create(mask_mod(layout, documents), documents.shape[0], n, n, device)

    return layout.cached(("flex", str(device)), build)


def decode_rows(n: int) -> int:
    """The rows a decoding forward of n rows is padded to: 128 (the kernel's tile), or the next
    power of two for a longer prefill: a few buckets, whatever the prompts."""
    return max(128, 1 << (n - 1).bit_length())


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    from cascade_mega.runtime import compilation

    compilation.configure()
    return torch.compile(flex_attention, dynamic=False, backend=_counted("flex_attention"))


def run(q, k, v, mask, scale: float | None = None):
    """The compiled flex attention of q [b, h, S, d] over k, v [b, g, S', d] under `mask`."""
    try:
        return _compiled()(q, k, v, block_mask=mask, scale=scale,
                           enable_gqa=k.shape[1] != q.shape[1])
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise RecompileLimit(
            f"FlexAttention compiled {compiles()} signatures, past its limit of "
            f"{torch._dynamo.config.recompile_limit} (a new one: q {tuple(q.shape)} "
            f"{q.dtype}, grad {torch.is_grad_enabled()}); uncompiled it would materialise the "
            "whole score matrix. Each block size, grad mode, dtype and decoding row bucket is "
            "one (kernels/flex.py)") from err


def attention(q, k, v, layout, scale: float | None = None):
    """q: [b, h, S, d]; k, v: [b, g, S, d] over the rows of `layout` (not split across ranks)."""
    return run(q, k, v, block_mask(layout, q.device), scale)
