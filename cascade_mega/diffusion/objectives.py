"""The objective a run trains, by the name in `diffusion.objective`.

The built-in objectives are imported here so that they register; an objective defined elsewhere
registers itself with `base.register` when its module is imported.
"""

from __future__ import annotations

from cascade_mega.config import ConfigError
from cascade_mega.diffusion import block  # noqa: F401  the built-in objectives register
from cascade_mega.diffusion.base import REGISTRY, Objective, Shard


def build(cfg, tokenizer, shard: Shard, teacher=None) -> Objective:
    name = cfg.diffusion.objective
    if name not in REGISTRY:
        raise ConfigError(f"'diffusion.objective' = {name!r} has no objective; registered: "
                          f"{', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](cfg, tokenizer, shard, teacher)
