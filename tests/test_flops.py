"""The FLOP formula behind MFU: matmuls against torch's FLOP counter on the real model, the
objective's layout (its rows, read-out rows and attention pairs) against what `prepare` lays out
and the dense mask's non-zeros."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cascade_mega.config.objectives import layout_of
from cascade_mega.diffusion.flops import forward_flops
from cascade_mega.diffusion import objective
from cascade_mega.diffusion.masks import dense_mask
from helpers import MASK_ID, VOCAB, random_tokens, score, tiny_cfg, tiny_model

CASES = [[], ["diffusion.objective=ar"], ["diffusion.block_size=16"],
         ["diffusion.ar_loss_weight=0.5"], ["diffusion.clean_stream=causal",
                                            "diffusion.ar_loss_weight=0.5", "diffusion.views=2"],
         ["diffusion.views=2", "diffusion.complementary=true", "diffusion.shifted_prediction=true",
          "model.num_query_groups=2"],
         # experts: the active ones (top 2 of 4), a gated shared expert, the router; layer 1 dense
         ["model.moe.num_experts=4", "model.moe.ffn_hidden_size=32",
          "model.moe.first_dense_layers=1", "model.moe.shared_expert_size=64",
          "model.moe.shared_expert_gate=true"]]


@pytest.mark.parametrize("overrides", CASES)
def test_the_objectives_layout_is_what_it_lays_out(overrides):
    cfg = tiny_cfg(*overrides)
    L = cfg.data.seq_len
    tokens = torch.zeros(1, L, dtype=torch.long)
    prep = objective.prepare(tokens, tokens, torch.ones(1, L), cfg, MASK_ID,
                             torch.Generator().manual_seed(0))
    n, layout = prep.layout.total_len, layout_of(cfg)
    assert (layout.rows, layout.readout, layout.kind) == (
        prep.input_ids.shape[1], prep.readout.labels.shape[1], prep.layout.kind)
    assert layout.pairs == int(dense_mask(prep.layout.mask_fn(), n, n).sum())


@pytest.mark.parametrize("overrides", CASES)
def test_matmul_flops_equal_torchs_count_of_the_model(megatron, overrides):
    cfg = tiny_cfg("model.attention_kernel=dense", *overrides)
    model = tiny_model(cfg)
    L = cfg.data.seq_len
    tokens = random_tokens(1, L, torch.Generator().manual_seed(1))
    prep = objective.prepare(tokens, tokens, torch.ones(1, L), cfg, MASK_ID,
                             torch.Generator().manual_seed(2))
    with FlopCounterMode(display=False) as counter:
        score(model, prep)
    counted = counter.get_flop_counts()["Global"]
    assert forward_flops(cfg, VOCAB)[0] == counted[torch.ops.aten.mm]
