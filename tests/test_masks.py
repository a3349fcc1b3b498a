"""One mask source: every form the project derives from `AttentionLayout` (its dense mask, the
context-parallel rows, FlexAttention's `mask_mod`, the tiled kernel's pieces, the KV cache's
decoding mask, `training_mask`) against `mask_reference.py`, which is written from the mission's
definitions with explicit loops (and BD3-LM's published formula) and shares no code with it."""

import pytest
import torch

from cascade_kernels import flex, tiled
from cascade_mega.diffusion import AttentionLayout, training_mask
from cascade_mega.inference.kv_cache import CLEAN, IDLE, NOISY, DecodeStep, KVCache
from mask_reference import bd3lm_block_diff_mask, reference, zigzag_rows

# (kind, L, B, V, causal_stream[, clean_stream]): every layout the project trains with
LAYOUTS = [("causal", 16, 1, 1, False), ("full", 16, 16, 1, False), ("full", 12, 12, 3, False),
           ("block_diffusion", 16, 1, 1, False), ("block_diffusion", 16, 4, 1, False),
           ("block_diffusion", 12, 3, 1, False), ("block_diffusion", 16, 16, 1, False),
           ("block_diffusion", 16, 4, 2, False), ("block_diffusion", 16, 8, 3, False),
           ("block_diffusion", 16, 4, 1, True), ("block_diffusion", 16, 2, 2, True),
           ("block_diffusion", 16, 4, 1, False, "causal"),
           ("block_diffusion", 12, 3, 2, False, "causal")]


def documents(L, seed, b=2):
    """[b, L] document ids of packed sequences: a few random document boundaries per row."""
    g = torch.Generator().manual_seed(seed)
    starts = (torch.rand(b, L, generator=g) < 0.2).long()
    starts[:, 0] = 0
    return starts.cumsum(1)


def layout_of(kind, L, B, V, causal_stream, clean="block_causal", docs=None):
    return AttentionLayout(kind, L, B, V, documents=docs, causal_stream=causal_stream,
                           clean_stream=clean)


def test_bd3lm_block_diff_mask_equals_training_mask():
    pairs = [(L, B) for L in range(1, 51) for B in range(1, L + 1) if L % B == 0]
    assert len(pairs) == 207
    for L, B in pairs:
        idx = torch.arange(2 * L)
        expected = bd3lm_block_diff_mask(idx[:, None], idx[None, :], B, L)
        assert torch.equal(training_mask(L, B), expected), (L, B)


@pytest.mark.parametrize("spec", LAYOUTS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("with_documents", [False, True])
def test_layout_dense_mask_and_flex_mask_mod_match_the_reference(spec, with_documents):
    kind, L, B, V, aux, *clean = spec
    docs = documents(L, seed=L * 7 + B + V) if with_documents else None
    ref = reference(kind, L, B, V, aux, docs, *clean)
    layout = layout_of(kind, L, B, V, aux, *clean, docs=docs)
    assert torch.equal(layout.dense(), ref)
    S = layout.total_len
    q, k = torch.arange(S)[None, :, None], torch.arange(S)[None, None, :]
    if docs is None:
        assert torch.equal(flex.mask_mod(layout)(0, 0, q[0], k[0]), ref)
    else:
        b = torch.arange(docs.shape[0])[:, None, None]
        assert torch.equal(flex.mask_mod(layout, docs)(b, 0, q, k), ref[:, 0])


@pytest.mark.parametrize("spec,size", [(("causal", 16, 1, 1, False), 2),
                                       (("block_diffusion", 16, 2, 1, False), 2),
                                       (("block_diffusion", 24, 2, 2, False), 3),
                                       (("block_diffusion", 16, 4, 1, False), 2),
                                       (("block_diffusion", 16, 2, 2, False, "causal"), 2)])
def test_context_parallel_rows_hold_the_reference_rows(spec, size):
    kind, L, B, V, aux, *clean = spec
    docs = documents(L, seed=size)
    ref = reference(kind, L, B, V, aux, docs, *clean)
    whole = layout_of(kind, L, B, V, aux, *clean, docs=docs)
    for rank in range(size):
        rows = zigzag_rows(kind, L, V, aux, rank, size)
        split = whole.split_for_context(rank, size)
        assert split.rows().tolist() == rows
        assert torch.equal(split.dense(), ref[..., rows, :][..., rows])


@pytest.mark.parametrize("L,B,V,T", [(16, 4, 1, 8), (16, 2, 2, 4), (12, 3, 3, 6), (16, 1, 0, 4)])
@pytest.mark.parametrize("with_documents", [False, True])
def test_tiled_kernel_pieces_cover_exactly_the_reference(L, B, V, T, with_documents):
    """The tiled kernel attends, per tile g, piece (b) (its diagonal mask over the tile of every
    stream) and piece (a) (the clean prefix); assembled, they are the reference mask. V = 0 with
    B = 1 is its causal (AR) form."""
    kind, n = ("causal", 1) if V == 0 else ("block_diffusion", V)
    docs = documents(L, seed=L + V) if with_documents else None
    ref = reference(kind, L, B, n, False, docs)
    ref = ref if docs is not None else ref[None, None]
    got = torch.zeros_like(ref)
    clean = V * L
    for g in range(L // T):
        rows = torch.cat([torch.arange(L)[r] if r.start < L else torch.arange(V * L + L)[r]
                          for r in tiled._tile_rows(L, V, T, g)])
        diag, prefix, _ = tiled.tile_masks(B, V, T, g, docs, torch.float64, torch.device("cpu"))
        got[..., rows[:, None], rows[None, :]] = (diag == 0).expand(*got.shape[:2], -1, -1)
        if g:
            keys = torch.arange(clean, clean + g * T)
            seen = torch.ones(1, 1, len(rows), g * T, dtype=torch.bool) if prefix is None \
                else prefix == 0
            got[..., rows[:, None], keys[None, :]] = seen.expand(*got.shape[:2], -1, -1)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("clean", ["block_causal", "causal"])
def test_decoding_mask_is_the_training_mask_of_its_rows(clean):
    """A decoding forward's rows (clean: committed tokens; noisy: the block being denoised;
    idle: padding) attend as the same rows of the training layout do, a causal clean stream
    too; a clean row sees the cache up to its sequence's length, a noisy row the cached
    positions before its block."""
    g = torch.Generator().manual_seed(3)
    b, n, L, B = 3, 10, 12, 3
    kinds = torch.randint(0, 3, (b, n), generator=g)
    positions = torch.randint(0, L, (b, n), generator=g)
    cache = KVCache(b, 32)
    cache.lengths = torch.tensor([0, 5, 2])
    step = DecodeStep(cache, kinds, positions, B, clean_stream=clean)
    mask = step._mask()[:, 0]
    used = int(cache.lengths.max())
    ref = reference("block_diffusion", L, B, 1, clean=clean)
    for i in range(b):
        for q in range(n):
            active = kinds[i, q] != IDLE
            start = int(positions[i, q]) // B * B  # a noisy row: the cache before its block
            seen = int(cache.lengths[i]) if kinds[i, q] == CLEAN else start
            for c in range(used):
                assert bool(mask[i, q, c]) == (bool(active) and c < min(seen, cache.lengths[i]))
            for k in range(n):
                if not active or kinds[i, k] == IDLE:
                    expected = q == k and not active
                else:
                    row = lambda j: int(positions[i, j]) + (L if kinds[i, j] == CLEAN  # noqa
                                                            else 0)
                    expected = bool(ref[row(q), row(k)])
                assert bool(mask[i, q, used + k]) == expected, (i, q, k)
    assert (kinds == NOISY).any() and (kinds == CLEAN).any()


@pytest.mark.parametrize("L,B", [(8, 3), (0, 1), (8, 0)])
def test_training_mask_rejects_bad_sizes(L, B):
    with pytest.raises(ValueError):
        training_mask(L, B)
