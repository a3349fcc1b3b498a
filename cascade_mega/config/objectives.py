"""Objectives by name, and the sequence layout each one answers for a config.

`diffusion.objective` names a registered objective class (`register`, used by
`diffusion/base.py` and by any objective of a user's own). What the rest of the project needs to
know about a run's sequence (rows per sample, rows that carry a prediction, the attention pairs
its mask allows, whether it is causal, full or block diffusion, the block a context-parallel
chunk must hold whole) is the objective's own answer, `ObjectiveClass.layout(cfg)`, a
`SequenceLayout`: the config rules, `cascade plan`, the FLOP count and the decoders ask
`layout_of(cfg)`, never the objective's name.

The registry lives at the bottom of the import order, beside the config, so the rules can ask it
while objectives import the config as before. The config layer imports no objective: the
library's own (`cascade_mega.diffusion.objectives`) and the modules a config lists in `imports`
are imported by name when a config is first checked (`load_modules`), the way a plugin host finds
its plugins. A new objective is one module: it registers its class, and a run names it (and, if
it lives outside the library, its module in `imports`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from cascade_mega.config.sections import ConfigError

REGISTRY: dict = {}  # name -> objective class
BUILT_IN = "cascade_mega.diffusion.objectives"  # imported by name: its objectives register


@dataclass(frozen=True)
class SequenceLayout:
    """What one sample of a run occupies in the model (`AttentionLayout` kinds)."""

    kind: str  # 'causal' (AR), 'full' (B = L diffusion) or 'block_diffusion' (noisy + clean)
    rows: int  # rows one sample occupies (what the pipeline sends, what every matmul runs)
    readout: int  # rows of one sample that carry a prediction (what reaches the output layer)
    pairs: int  # (query, key) pairs its mask allows per sample (attention FLOPs)
    block: int  # a context-parallel chunk holds whole blocks of this size (1: causal)

    @property
    def causal(self) -> bool:
        return self.kind == "causal"


def register(*names: str):
    """Class decorator: the objective that `diffusion.objective = NAME` builds."""
    def add(cls):
        for name in names:
            REGISTRY[name] = cls
        return cls
    return add


def load_modules(modules=()) -> None:
    """Import the library's objectives and `modules` (a config's `imports`), once each: their
    objectives register. One message for a module that does not import."""
    for name in (BUILT_IN, *modules):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"'imports' names module {name!r}, which does not import "
                              f"({err})") from None


def objective_class(cfg):
    """The registered class `cfg.diffusion.objective` names; one message naming the choices."""
    load_modules(cfg.imports)
    name = cfg.diffusion.objective
    if name not in REGISTRY:
        raise ConfigError(f"'diffusion.objective' = {name!r} is not a registered objective; "
                          f"registered: {', '.join(sorted(REGISTRY))} (an objective of your own "
                          "registers itself in a module the config lists in 'imports')")
    return REGISTRY[name]


def layout_of(cfg) -> SequenceLayout:
    """The run's sequence layout, as its objective answers it."""
    return objective_class(cfg).layout(cfg)
