"""The core attention used in training against dense float64 attention under training_mask."""

import math

import pytest
import torch

from cascade_mega.config import load_config
from cascade_mega.diffusion import AttentionLayout, training_mask
from cascade_mega.model.attention import BlockDiffusionAttention
from cascade_mega.model.gpt import transformer_config


def dense_reference(q, k, v, mask):
    """q: [s, b, h, d], k/v: [s, b, g, d]; explicit softmax over allowed keys, float64."""
    h, g = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // g, dim=2)
    v = v.repeat_interleave(h // g, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def make_attention(heads, groups):
    cfg = load_config(None, ["run_dir=/tmp/x", "model.hidden_size=64",
                             f"model.num_attention_heads={heads}",
                             f"model.num_query_groups={groups}"])
    tconf = transformer_config(cfg, torch.float64)
    return BlockDiffusionAttention(tconf, 1, None, "self")


@pytest.mark.parametrize("L,B", [(8, 1), (8, 4), (16, 4), (16, 16), (32, 8)])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)])
def test_block_diffusion_attention_matches_dense(megatron, L, B, heads, groups):
    torch.manual_seed(L * 100 + B + groups)
    attn = make_attention(heads, groups)
    d, b, S = 16, 2, 2 * L
    q = torch.randn(S, b, heads, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(S, b, groups, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(S, b, groups, d, dtype=torch.float64, requires_grad=True)
    layout = AttentionLayout("block_diffusion", L, B)
    out = attn(q, k, v, layout)
    ref = dense_reference(q, k, v, training_mask(L, B))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["causal", "full"])
def test_ar_and_full_diffusion_layouts(megatron, kind):
    torch.manual_seed(7)
    attn = make_attention(4, 2)
    L, b, d = 12, 2, 16
    q = torch.randn(L, b, 4, d, dtype=torch.float64)
    k = torch.randn(L, b, 2, d, dtype=torch.float64)
    v = torch.randn(L, b, 2, d, dtype=torch.float64)
    mask = torch.ones(L, L, dtype=torch.bool)
    if kind == "causal":
        mask = mask.tril()
    torch.testing.assert_close(attn(q, k, v, AttentionLayout(kind, L, L)),
                               dense_reference(q, k, v, mask), rtol=1e-10, atol=1e-10)


def test_attention_refuses_a_tensor_mask(megatron):
    attn = make_attention(4, 4)
    x = torch.randn(4, 1, 4, 16)
    with pytest.raises(TypeError):
        attn(x, x, x, torch.ones(4, 4, dtype=torch.bool))
