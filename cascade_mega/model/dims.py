"""The model's dimensions as the cost models read them: the memory plan (`plan.py`) and the FLOP
count (`diffusion/flops.py`) take them from here, one reading of the config (`model.*`) with the
model's own rules for the FFN size and the padded vocabulary (`model/gpt.py`), so neither can
count a model other than the one `build_model` builds.

The builder's rules are imported when called, so importing this module (`plan.py` does, at the
top) loads no megatron-core.
"""

from __future__ import annotations


def model_dims(cfg, vocab: int) -> dict:
    """h, a (heads), g (query groups), d (head dim), f (FFN), V (padded vocabulary, per the
    tensor-parallel size)."""
    from cascade_mega.model.gpt import ffn_size, vocab_rows

    m = cfg.model
    return dict(h=m.hidden_size, a=m.num_attention_heads, g=m.num_query_groups or
                m.num_attention_heads, d=m.kv_channels or m.hidden_size // m.num_attention_heads,
                f=ffn_size(cfg), V=vocab_rows(cfg, vocab))
