"""What the decoders ask of a model: the one interface between the decoding core and a network.

The decoding core is `kv_cache.py` (the cache and the decoding masks), `decode.py` (block and AR
decoding), `full_diffusion.py` (the canvas decoder), `policies.py` and `sampling.py`; this module
only states what they ask. The core imports nothing of the project but itself, the mask source
(`diffusion/masks.py`) and the user-error base (`errors.py`), all plain torch, so `cascade
convert mcore-to-hf` copies these files into an exported model (`convert/export.py: CORE`) and
the exported `generate` runs the very code `cascade generate` runs: a policy added to the library
reaches exported models with no second edit (`tests/test_imports.py` holds the core to that).

Two networks implement it: `MegatronNetwork` (`inference/megatron.py`, the megatron-core model
of a run) and the exported `CascadeForCausalLM` (`convert/remote/modeling_cascade.py`).

A decoding forward passes a *step* object (`kv_cache.DecodeStep`, `full_diffusion.CanvasStep`)
where training passes an attention layout: each attention layer calls
`step.attend(layer, q, k, v, scale, kernel)` with its queries and this forward's keys and values
(RoPE applied), and uses what it returns as the core attention's output. The step owns the cache
and the mask; the network owns everything else.
"""

from __future__ import annotations

from typing import ContextManager, List, Optional, Protocol

import torch


class Network(Protocol):
    max_len: int  # the context: positions 0 .. max_len - 1
    block_size: int  # B of block decoding (1 for an AR model)
    causal: bool  # an AR model: block size 1, each forward commits one token
    full: bool  # a full-diffusion model (B = L): `FullDiffusionDecoder`
    shifted: bool  # position p is predicted from row p - 1
    clean_stream: str  # how committed rows attend each other: block_causal | causal
    ar_trained: bool  # the clean stream was trained to predict the next token (speculative)
    scores: bool  # the logits are a score-entropy model's scores (policy `tweedie`)
    time_conditioning: bool  # the forward takes each row's noise level
    mask_id: int
    eod: int  # end of document: a sequence stops when it is decided
    device: torch.device
    flex: Optional[object]  # the FlexAttention kernel module when the layers attend through it

    def logits(self, ids: torch.Tensor, pos: torch.Tensor, step, rows: torch.Tensor,
               levels: Optional[torch.Tensor]) -> torch.Tensor:
        """fp32 logits [b, len(rows), V] of rows `rows` of a forward over token ids and position
        ids [b, n] (on `device`), ids the model never predicts at -inf; levels: [b, n] noise
        levels (time conditioning) or None."""

    def decoding(self) -> ContextManager:
        """The context a generation runs in (evaluation mode; no FP8)."""

    def detokenize(self, tokens: List[int]) -> str:
        """The text of generated tokens ("" where the network has no tokenizer)."""
