"""Transformer Engine is optional (extra `[gpu]`): detect it without breaking CPU machines.

Importing TE without a GPU raises RuntimeError/OSError rather than ImportError, so the probe catches
broadly; but a TE that is installed and fails to import on a GPU host is a broken install, not an
absent one, and its error is kept (`import_error`) and reported: by `require` when something needs
TE (the TE layer spec, FP8), and as a warning when `model.attention_backend=auto` falls back to the
local spec.
"""

from __future__ import annotations

import functools
import importlib.util
import sys


@functools.lru_cache(maxsize=1)
def _probe():
    """(available, why not): why not is '' when TE is simply not installed or there is no GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False, ""
        if importlib.util.find_spec("transformer_engine") is None:
            return False, ""
        import transformer_engine.pytorch  # noqa: F401
        return True, ""
    except Exception as err:  # TE raises RuntimeError/OSError on machines it cannot run on
        return False, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"


def available() -> bool:
    return _probe()[0]


def import_error() -> str:
    """The error of an installed Transformer Engine that does not import here ('' otherwise)."""
    return _probe()[1]


def require(feature: str) -> None:
    if not available():
        why = import_error()
        if why:
            raise RuntimeError(f"{feature} needs Transformer Engine, which is installed but does "
                               f"not import: {why}")
        raise RuntimeError(f"{feature} needs Transformer Engine on a CUDA GPU "
                           "(pip install 'cascade-mega[gpu]' on a GPU machine)")


def use_for_auto() -> bool:
    """`model.attention_backend=auto`: TE where it imports; a broken install is named once."""
    if not available() and import_error() and not getattr(use_for_auto, "warned", False):
        use_for_auto.warned = True
        print(f"cascade: warning: Transformer Engine is installed but does not import "
              f"({import_error()}); model.attention_backend=auto falls back to the local spec",
              file=sys.stderr, flush=True)
    return available()


def layer_spec(**kwargs):
    require("model.attention_backend=te")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(**kwargs)


def layers_used(cfg) -> bool:
    """Whether the model is built from Transformer Engine's layers (FP8, te, or auto where TE
    imports)."""
    backend = cfg.model.attention_backend
    return bool(cfg.train.fp8) or backend == "te" or (backend == "auto" and use_for_auto())


def init_userbuffers(cfg, rows: int) -> None:
    """`parallel.tp_comm_overlap`: Transformer Engine's userbuffers for the tensor-parallel
    all-gather / reduce-scatter overlapped with the GEMMs, sized as Megatron-LM sizes them (the
    sequence rows of a micro-batch per context rank, by the hidden size), after the model is
    built and before its first forward (TE's layers look the buffers up when they run). Their
    shape is fixed: evaluation must use the same rows (no distillation rows). GPU-only and not
    measured on this project's machines (no TE here)."""
    require("parallel.tp_comm_overlap")
    from transformer_engine.pytorch.module import base

    shape = [rows * cfg.train.micro_batch_size // cfg.parallel.context, cfg.model.hidden_size]
    base.initialize_ub(shape=shape, tp_size=cfg.parallel.tensor, use_fp8=bool(cfg.train.fp8))
