"""Transformer Engine is optional (extra `[gpu]`): detect it without breaking CPU machines.

Importing TE without a GPU raises RuntimeError/OSError rather than ImportError, so the probe catches
broadly. Everything that needs TE (the TE layer spec, FP8) asks here and fails with one message.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # TE raises RuntimeError/OSError on machines it cannot run on
        return False


def require(feature: str) -> None:
    if not available():
        raise RuntimeError(f"{feature} needs Transformer Engine on a CUDA GPU "
                           "(pip install 'cascade-mega[gpu]' on a GPU machine)")


def layer_spec():
    require("model.attention_backend=te")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()
