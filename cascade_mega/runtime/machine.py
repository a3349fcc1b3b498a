"""What a run needs from the machine it runs on, checked there at start-up, once.

A login node that submits, plans or expands a sweep has no GPU and often no Transformer Engine or
DALI: the config checks (`config.validate`) are about the config alone, and these probes run only
where the job runs (`Trainer.setup`): FP8 and the TE layer spec need Transformer Engine on a CUDA
GPU, `data.backend=dali` needs DALI. Each failure is one `ConfigError` naming the key.
"""

from __future__ import annotations

import importlib.util

from cascade_mega.config import CascadeConfig, ConfigError
from cascade_mega.runtime import te_support


def check(cfg: CascadeConfig) -> None:
    needs_te = [("train.fp8", cfg.train.fp8),
                ("model.attention_backend", "te" if cfg.model.attention_backend == "te" else None),
                ("parallel.tp_comm_overlap", cfg.parallel.tp_comm_overlap or None)]
    for key, value in needs_te:
        if value and not te_support.available():
            why = te_support.import_error()
            raise ConfigError(f"'{key}' = {value} needs Transformer Engine on a CUDA GPU; " + (
                f"it is installed but does not import here ({why})" if why else
                "this machine has none (install the [gpu] extra on the GPU nodes)"))
    if cfg.parallel.tp_comm_overlap and not te_support.layers_used(cfg):
        raise ConfigError("'parallel.tp_comm_overlap' needs the Transformer Engine layers "
                          "('model.attention_backend' = te or auto): the overlap lives in TE's "
                          "linear layers")
    if cfg.data.backend == "dali" and (importlib.util.find_spec("nvidia") is None or
                                       importlib.util.find_spec("nvidia.dali") is None):
        raise ConfigError("'data.backend' = dali needs NVIDIA DALI: install the [dali] extra "
                          "(nvidia-dali-cuda120)")
