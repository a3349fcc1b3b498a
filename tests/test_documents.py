"""`data.document_mask`: attention and loss stay inside each document of a packed sequence.

The reference runs the same megatron model on one document at a time: only that document's rows
(of every stream), under the plain layout mask restricted to them (SDPA with an explicit mask), with
the packed run's noise and positions. The packed NELBO must be the sum of these.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cascade_mega.diffusion import objective
from cascade_mega.diffusion.masks import AttentionLayout, document_ids
from cascade_mega.diffusion.objective import ReadOut
from cascade_mega.model.gpt import predict_and_score
from helpers import MASK_ID, score, tiny_cfg, tiny_model

EOD = MASK_ID - 1
L = 32


def packed_tokens(seed=0):
    """Two sequences of random tokens; documents end at positions that do not align with blocks."""
    tokens = torch.randint(0, EOD, (2, L), generator=torch.Generator().manual_seed(seed))
    tokens[0, [6, 17]] = EOD
    tokens[1, 12] = EOD
    return tokens


class ExplicitMask:
    """A mask that attends itself (the hook the decoder's KV cache uses): SDPA, True = attend."""

    def __init__(self, mask):
        self.mask = mask

    def attend(self, layer, q, k, v, scale=None, kernel="sdpa"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale)


CASES = {
    "block_diffusion": [],
    "shifted": ["diffusion.shifted_prediction=true"],
    "two_views": ["diffusion.views=2", "diffusion.complementary=true"],
    "full_diffusion": ["diffusion.block_size=32"],
    "ar": ["diffusion.objective=ar"],
}


def _cfg(case, document_mask=True):
    return tiny_cfg(f"data.seq_len={L}", "train.precision=fp32",
                    f"data.document_mask={str(document_mask).lower()}", *CASES[case])


def _prepare(cfg, tokens):
    labels = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), 5)], 1)
    return objective.prepare(tokens, labels, torch.ones(tokens.shape), cfg, MASK_ID,
                             torch.Generator().manual_seed(7), eod_id=EOD)


def test_document_ids_and_mask_never_cross():
    tokens = packed_tokens()
    docs = document_ids(tokens, EOD)
    assert docs[0].tolist() == [0] * 7 + [1] * 11 + [2] * 14  # an EOD ends its own document
    for layout in [AttentionLayout("block_diffusion", L, 4), AttentionLayout("block_diffusion", L,
                   4, views=2), AttentionLayout("causal", L), AttentionLayout("full", L, L)]:
        plain = layout.dense()
        mask = replace(layout, documents=docs).dense()
        row_doc = docs[:, torch.arange(layout.total_len) % L]
        same = row_doc[:, :, None] == row_doc[:, None, :]
        assert not mask[:, 0][~same].any()  # nothing across documents ...
        assert torch.equal(mask[:, 0][same], plain.expand_as(same)[same])  # ... the rest as before


@pytest.mark.parametrize("case", list(CASES))
def test_packed_nelbo_is_the_sum_over_documents(megatron, case):
    cfg = _cfg(case)
    model = tiny_model(cfg, seed=3)
    tokens = packed_tokens()
    with torch.no_grad():
        prep = _prepare(cfg, tokens)
        packed, _ = objective.reduce(*score(model, prep), prep)
        docs = prep.layout.documents
        plain = replace(prep.layout, documents=None)
        rows = prep.readout.rows if prep.readout.rows is not None else torch.arange(plain.total_len)
        n = prep.weight.shape[1] // plain.views if plain.kind != "causal" else L
        shift = L - n  # 1 under shifted prediction
        total = 0.0
        for s in range(tokens.shape[0]):
            row_doc = docs[s, torch.arange(plain.total_len) % L]
            target_doc = docs[s, torch.arange(prep.weight.shape[1]) % n + shift]
            for d in docs[s].unique():
                idx = torch.nonzero(row_doc == d).squeeze(1)
                local = torch.full((plain.total_len,), -1)
                local[idx] = torch.arange(idx.numel())
                mine = torch.nonzero(target_doc == d).squeeze(1)
                # a target of this document predicted from another document's row carries no loss
                crossing = local[rows[mine]] < 0
                assert not prep.weight[s, mine[crossing]].any()
                assert not prep.scored[s, mine[crossing]].any()
                mine = mine[~crossing]
                ce, _ = model(prep.input_ids[s:s + 1, idx], prep.position_ids[:, idx],
                              ExplicitMask(plain.dense()[idx][:, idx]),
                              output_processor=predict_and_score,
                              output_processor_context=ReadOut(local[rows[mine]],
                                                               prep.readout.labels[s:s + 1, mine]))
                total += float((ce[0].double() * prep.weight[s, mine]).sum())
    assert float(packed) == pytest.approx(total, rel=1e-5)
    ends = int((tokens == EOD).sum())
    expected_tokens = {"shifted": 2 * (L - 1) - ends, "ar": 2 * L - ends}.get(case, 2 * L)
    assert prep.num_tokens == expected_tokens


@pytest.mark.parametrize("case", ["block_diffusion", "shifted", "ar"])
def test_other_documents_do_not_change_a_documents_loss(megatron, case):
    """Rewrite the first document: every other document's per-token loss stays put (and does
    move without the option, so the check has teeth)."""
    tokens = packed_tokens()
    edited = tokens.clone()
    edited[:, :6] = (edited[:, :6] + 1) % EOD
    for document_mask in (True, False):
        cfg = _cfg(case, document_mask)
        model = tiny_model(cfg, seed=4)
        with torch.no_grad():
            a, b = (score(model, _prepare(cfg, x))[0] for x in (tokens, edited))
        later = slice(L // 2, None)  # targets in the second and third documents
        if document_mask:
            torch.testing.assert_close(a[0, later], b[0, later], rtol=0, atol=1e-6)
        else:
            assert (a[0, later] - b[0, later]).abs().max() > 1e-4
        assert (a[0, :5] - b[0, :5]).abs().max() > 1e-4  # the edited document itself moved


def test_training_with_document_mask(megatron, tmp_path):
    from cascade_mega.config import load_config
    from cascade_mega.train.trainer import Trainer

    cfg = load_config(None, [f"run_dir={tmp_path}", "model.num_layers=2", "model.hidden_size=64",
                             "data.seq_len=64", "diffusion.block_size=8", "train.steps=3",
                             "train.micro_batch_size=2", "train.global_batch_size=2",
                             "optimizer.warmup_steps=1", "train.eval_interval=0",
                             "tracking.enabled=false", "data.document_mask=true"])
    trainer = Trainer(cfg, []).setup()
    batches = list(trainer.objective.batch(trainer.train_data, 0, "train").make())
    assert batches[0].layout.documents is not None
    trainer.fit()
    assert trainer.step == 3
