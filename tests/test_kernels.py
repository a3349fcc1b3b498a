"""Attention kernels, and the core attention that megatron-core's layers call, against dense
float64 attention under the reference mask (`mask_reference.py`, written from the definitions;
`test_masks.py` checks every mask the project derives against it)."""

import math

import pytest
import torch

from cascade_kernels import flex, tiled
from cascade_mega.bench.memory import PeakMemory
from cascade_mega.diffusion import AttentionLayout
from mask_reference import reference


def dense_reference(q, k, v, mask):
    """q: [b, h, s, d]; k, v: [b, g, s, d]; explicit masked softmax in float64."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def inputs(S, heads, groups, seed, d=8, b=2):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(b, n, S, d, dtype=torch.float64, generator=g,  # noqa: E731
                               requires_grad=True)
    return mk(heads), mk(groups), mk(groups)


CASES = [(L, B) for L in (4, 8, 32, 64, 256) for B in (1, 4, 16, L)
         if B <= L and L % B == 0 and (L in (64, 256) or L in (B, 2 * B))]


@pytest.mark.parametrize("L,B", CASES)
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 1)])
def test_tiled_matches_dense_outputs_and_gradients(L, B, heads, groups):
    q, k, v = inputs(2 * L, heads, groups, seed=L * 31 + B + groups)
    tile = tiled.tile_size(L, B, target=32)  # small tiles: many tiles even at small L
    out = tiled.block_diffusion_attention(q, k, v, L, B, tile=tile)
    ref = dense_reference(q, k, v, reference("block_diffusion", L, B))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("V,clean", [(2, "block_causal"), (3, "block_causal"), (1, "causal"),
                                     (2, "causal")])
def test_tiled_views_match_dense(V, clean):
    """Several views, and a causal clean stream (`diffusion.clean_stream`)."""
    L, B = 32, 4
    q, k, v = inputs((V + 1) * L, 4, 2, seed=V)
    mask = reference("block_diffusion", L, B, V, clean=clean)
    out = tiled.block_diffusion_attention(q, k, v, L, B, views=V, tile=8, clean_stream=clean)
    ref = dense_reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L,B,V,clean", [(16, 4, 1, "block_causal"), (32, 8, 2, "block_causal"),
                                         (32, 8, 1, "causal")])
def test_flex_mask_mod_forward_matches_dense(L, B, V, clean):
    # FlexAttention has no CPU backward; its forward checks the mask function the GPU path uses.
    S = (V + 1) * L
    q, k, v = (x.detach().float() for x in inputs(S, 4, 4, seed=S))
    out = flex.attention(q, k, v, AttentionLayout("block_diffusion", L, B, V, clean_stream=clean))
    mask = reference("block_diffusion", L, B, V, clean=clean)
    torch.testing.assert_close(out, dense_reference(q.double(), k.double(), v.double(), mask)
                               .float(), rtol=1e-4, atol=1e-4)


class LargestAllocation(PeakMemory):
    """Also remembers the largest single storage allocated."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_training_path_allocates_nothing_of_size_2L_squared():
    L, B, b, h, d = 4096, 16, 1, 2, 16
    mask_bytes = (2 * L) ** 2  # one boolean (2L)^2 mask
    tiled.diagonal_bias.cache_clear()
    q = torch.randn(b, h, 2 * L, d, requires_grad=True)
    k = torch.randn(b, h, 2 * L, d, requires_grad=True)
    v = torch.randn(b, h, 2 * L, d, requires_grad=True)
    with LargestAllocation() as mem:
        out = tiled.block_diffusion_attention(q, k, v, L, B)
        out.sum().backward()
    assert mem.largest < mask_bytes / 8, mem.largest
    assert mem.peak < mask_bytes, mem.peak  # everything together stays under one such mask


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("kind,L,B,V,cp,clean", [("block_diffusion", 32, 4, 1, 2, "block_causal"),
                                                 ("block_diffusion", 48, 4, 2, 2, "block_causal"),
                                                 ("block_diffusion", 64, 2, 1, 4, "block_causal"),
                                                 ("block_diffusion", 32, 4, 1, 2, "causal"),
                                                 ("causal", 32, 1, 1, 2, "block_causal"),
                                                 ("full", 32, 32, 1, 2, "block_causal"),
                                                 ("full", 48, 48, 2, 3, "block_causal")])
def test_context_parallel_chunks_give_the_whole_sequence_attention(kind, L, B, V, cp, clean,
                                                                   documents):
    """Each simulated context-parallel rank attends its zigzag chunks (`attend`, the layers'
    entry) to the gathered streams (`gather_kv`'s: the whole clean stream, or every view of full
    diffusion); together they give the dense output and, summing each rank's gradient of the
    gathered rows back (what the gather's reduce-scatter does), the dense gradients. With packed
    documents too (boundaries inside tiles, so some rows have no key in the clean prefix)."""
    from cascade_mega.model.attention import attend, gathered_streams

    docs = torch.tensor([[0] * 5 + [1] * 12 + [2] * (L - 17), [0] * 9 + [1] * (L - 9)]) \
        if documents else None
    layout = AttentionLayout(kind, L, B, V, documents=docs, clean_stream=clean)
    n = layout.total_len
    q, k, v = inputs(n, 4, 2, seed=L + cp)
    ref = dense_reference(q, k, v, reference(kind, L, B, V, documents=docs, clean=clean))
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    out = torch.zeros_like(ref)
    got = [torch.zeros_like(x) for x in (q, k, v)]
    streams = gathered_streams(layout)
    clean_rows = slice(streams.start * L, streams.stop * L)
    for rank in range(cp):
        part = layout.split_for_context(rank, cp)
        rows = part.rows()
        assert part.total_len == rows.numel() == n // cp
        local = [x[:, :, rows].detach().requires_grad_() for x in (q, k, v)]
        clean_kv = [x[:, :, clean_rows].detach().requires_grad_() for x in (k, v)]
        o = attend(*local, part, clean_kv=tuple(clean_kv))
        o.backward(grad_out[:, :, rows])
        out[:, :, rows] = o.detach()
        for g, x in zip(got, local):  # full diffusion reads its keys only from the gather
            g[:, :, rows] += x.grad if x.grad is not None else 0
        got[1][:, :, clean_rows] += clean_kv[0].grad
        got[2][:, :, clean_rows] += clean_kv[1].grad
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for g, r in zip(got, grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind,B,V", [("block_diffusion", 4, 1), ("causal", 1, 1),
                                       ("full", 32, 2)])
def test_flex_document_mask_forward_matches_dense(kind, B, V):
    """Every kind of layout with packed documents (AR too: the GPU path of AR with documents),
    the block mask built once per layout object and reused."""
    L = 32
    layout = AttentionLayout(kind, L, B, V, documents=torch.tensor(
        [[0] * 7 + [1] * 11 + [2] * 14, [0] * 13 + [1] * 19]))
    S = layout.total_len
    q, k, v = (x.detach().float() for x in inputs(S, 4, 4, seed=11))
    out = flex.attention(q, k, v, layout)
    assert flex.block_mask(layout, q.device) is flex.block_mask(layout, q.device)  # built once
    ref = dense_reference(q.double(), k.double(), v.double(),
                          reference(kind, L, B, V, documents=layout.documents)).float()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ the core attention in the layers
def make_attention(heads, groups):
    from cascade_mega.config import load_config
    from cascade_mega.model.attention import BlockDiffusionAttention
    from cascade_mega.model.gpt import transformer_config

    cfg = load_config(None, ["run_dir=/tmp/x", "model.hidden_size=64",
                             f"model.num_attention_heads={heads}",
                             f"model.num_query_groups={groups}"])
    return BlockDiffusionAttention(transformer_config(cfg, torch.float64), 1, None, "self")


@pytest.mark.parametrize("kind,L,B,V,clean", [
    ("block_diffusion", 8, 1, 1, "block_causal"), ("block_diffusion", 16, 4, 1, "block_causal"),
    ("block_diffusion", 32, 8, 2, "block_causal"), ("block_diffusion", 16, 16, 1, "block_causal"),
    ("block_diffusion", 16, 4, 2, "causal"), ("causal", 12, 1, 1, "block_causal"),
    ("full", 12, 12, 2, "block_causal")])
def test_core_attention_in_megatron_layout_matches_dense(megatron, kind, L, B, V, clean):
    """`BlockDiffusionAttention` (megatron-core's [s, b, h, d] tensors, grouped-query heads) on
    every kind of layout, a causal clean stream too: outputs and gradients."""
    torch.manual_seed(L * 100 + B + V)
    attn = make_attention(4, 2)
    layout = AttentionLayout(kind, L, B, V, clean_stream=clean)
    S, b, d = layout.total_len, 2, 16
    q = torch.randn(S, b, 4, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(S, b, 2, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = attn(q, k, v, layout)
    as_heads = lambda x: x.permute(1, 2, 0, 3)  # noqa: E731  [s, b, h, d] -> [b, h, s, d]
    ref = dense_reference(as_heads(q), as_heads(k), as_heads(v),
                          reference(kind, L, B, V, clean=clean))
    ref = ref.permute(2, 0, 1, 3).reshape(S, b, -1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_core_attention_refuses_a_tensor_mask(megatron):
    attn = make_attention(4, 4)
    x = torch.randn(4, 1, 4, 16)
    with pytest.raises(TypeError):
        attn(x, x, x, torch.ones(4, 4, dtype=torch.bool))
