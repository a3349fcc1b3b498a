"""The objective a run trains, by the name in `diffusion.objective`.

The library's objectives are imported here so that they register (the config layer imports this
module by name, `config/objectives.py`); an objective defined elsewhere registers itself with
`base.register` when its module is imported (a config's `imports`).
"""

from __future__ import annotations

from cascade_mega.config.objectives import objective_class
from cascade_mega.diffusion import ar, block  # noqa: F401  the library's objectives register
from cascade_mega.diffusion.base import Objective, Shard


def build(cfg, tokenizer, shard: Shard, teacher=None) -> Objective:
    return objective_class(cfg)(cfg, tokenizer, shard, teacher)
