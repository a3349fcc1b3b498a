"""Sweep files: a base run config and grids of axes, expanded into runs with their compute.

    name: cpu_demo
    base: ../base.yaml              # the run config every run starts from (relative to this file)
    root: runs/sweeps/cpu_demo      # run directories: <root>/<run name>
    overrides: [data.seq_len=128]   # dotted overrides for every run
    head_dim: 32                    # width / head_dim attention heads (FFN and the rest derived)
    cluster: local                  # profile for --executor slurm; nodes / time optional
    grids:                          # each grid is a Cartesian product; the union is deduplicated
      - size: [[2, 64], [4, 128]]   # (depth, width) pairs; or separate `depth:` and `width:` axes
        tokens: [2.0e5, 4.0e5]      # training tokens: steps = tokens / (global batch x seq_len)
        objective: [ar, block_diffusion]
        block_size: [4, L]          # L: full-sequence diffusion (MDLM); 1 is AR
        lr: [1.0e-3]
        experts: [8, 16]            # optional: model.moe.num_experts (0: dense) ...
        top_k: [2]                  # ... and model.moe.top_k

A run's objective label is `ar` (the AR objective, or B = 1), `bd<B>` or `mdlm` (B = L); the fit
is per label (an MoE point's label names its experts and top-k: `bd4_e8k2`). Parameters N
count the non-embedding weights (Kaplan et al.: at small scale the embedding table would
dominate the count without adding compute per token), of an MoE model the active ones (the
dense weights and top-k / E of the experts'); compute C is
`diffusion/flops.py`'s honest count of a training step (the [x_t ; x_0] rows of block diffusion cost
their 2L rows) times the steps.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from cascade_mega.config import CascadeConfig, ConfigError, load_config

AXES = ("size", "depth", "width", "tokens", "objective", "block_size", "lr", "experts",
        "top_k")
KEYS = ("name", "base", "root", "overrides", "head_dim", "cluster", "nodes", "time",
        "experiment", "tracking_uri", "array_parallel", "warmup_fraction", "grids")


@dataclass
class Run:
    name: str
    label: str  # objective label the fit groups by: ar, bd<B>, mdlm
    point: Dict[str, object]  # the axis values
    overrides: List[str]
    cfg: CascadeConfig = None
    params: int = 0  # non-embedding parameters N
    tokens: int = 0  # training tokens D
    flops: float = 0.0  # training compute C


@dataclass
class Sweep:
    name: str
    path: str
    base: str
    root: str
    overrides: List[str] = field(default_factory=list)
    head_dim: int = 64
    cluster: Optional[str] = None
    nodes: Optional[int] = None
    time: Optional[str] = None
    experiment: Optional[str] = None
    tracking_uri: Optional[str] = None
    array_parallel: Optional[int] = None
    warmup_fraction: Optional[float] = None
    grids: List[dict] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.root}/mlflow.db"


def load_sweep(path: str, root: Optional[str] = None) -> Sweep:
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file not found: {path}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key '{unknown[0]}' (keys: {', '.join(KEYS)})")
    for key in ("name", "base"):
        if not raw.get(key):
            raise ConfigError(f"{path}: the sweep needs `{key}:`")
    here = os.path.dirname(os.path.abspath(path))
    grids = raw.pop("grids", None)
    if not grids or not isinstance(grids, list):
        raise ConfigError(f"{path}: `grids:` is empty: give at least one grid of axes")
    for i, grid in enumerate(grids):
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{path}: grid {i} is empty: give it axes ({', '.join(AXES)})")
        for axis, values in grid.items():
            if axis not in AXES:
                raise ConfigError(f"{path}: grid {i}: unknown axis '{axis}' "
                                  f"(axes: {', '.join(AXES)})")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid {i}: axis '{axis}' has no values "
                                  "(give a non-empty list)")
        if "size" in grid and ({"depth", "width"} & set(grid)):
            raise ConfigError(f"{path}: grid {i}: give `size:` or `depth:`/`width:`, not both")
    root = root or raw.pop("root", None) or os.path.join("runs", "sweeps", raw["name"])
    raw.pop("root", None)
    return Sweep(path=os.path.abspath(path), base=os.path.join(here, raw.pop("base")),
                 root=os.path.abspath(root), grids=grids,
                 overrides=[str(o) for o in raw.pop("overrides", None) or []], **raw)


def _points(grid: dict) -> List[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _fmt(x: float) -> str:
    for unit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= unit:
            return f"{x / unit:.3g}{suffix}"
    return f"{x:g}"


def _resolve(sweep: Sweep, point: dict, base: CascadeConfig) -> tuple:
    """(label, name, overrides, canonical point) of one grid point."""
    where = f"{sweep.path}: point {point}"
    if "size" in point:
        size = point["size"]
        if not (isinstance(size, list) and len(size) == 2):
            raise ConfigError(f"{where}: `size` values are [depth, width] pairs")
        depth, width = size
    else:
        depth = point.get("depth", base.model.num_layers)
        width = point.get("width", base.model.hidden_size)
    L = base.data.seq_len
    objective = point.get("objective", base.diffusion.objective)
    block = point.get("block_size", base.diffusion.block_size)
    if block == "L":
        block = L
    if not isinstance(block, int) or isinstance(block, bool):
        raise ConfigError(f"{where}: block_size {block!r} is not an integer or L")
    if objective not in ("ar", "block_diffusion"):
        raise ConfigError(f"{where}: objective {objective!r}; expected ar or block_diffusion")
    if block == 1:
        objective = "ar"  # B = 1 is AR (BD3-LM's end of the interpolation)
    label = "ar" if objective == "ar" else ("mdlm" if block == L else f"bd{block}")
    if not isinstance(width, int) or width % sweep.head_dim:
        raise ConfigError(f"{where}: width {width} is not a multiple of head_dim "
                          f"{sweep.head_dim}")
    gbs = base.train.global_batch_size
    if "tokens" not in point:
        raise ConfigError(f"{where}: no `tokens` axis: give each grid its token budgets")
    tokens = float(point["tokens"])
    steps = max(1, round(tokens / (gbs * L)))
    lr = float(point.get("lr", base.optimizer.lr))
    frac = sweep.warmup_fraction
    warmup = round(frac * steps) if frac is not None else min(base.optimizer.warmup_steps,
                                                              steps // 5)
    over = [f"model.num_layers={depth}", f"model.hidden_size={width}",
            f"model.num_attention_heads={width // sweep.head_dim}", "model.num_query_groups=null",
            "model.ffn_hidden_size=null", f"diffusion.objective={objective}",
            f"train.steps={steps}", f"optimizer.warmup_steps={warmup}",
            f"optimizer.lr={lr}", f"optimizer.min_lr={min(base.optimizer.min_lr, lr / 10)}",
            f"checkpoint.interval={min(base.checkpoint.interval, steps)}"]
    if objective == "block_diffusion":
        over.append(f"diffusion.block_size={block}")
    else:  # what only block diffusion has
        over += ["diffusion.ar_loss_weight=0", "diffusion.clean_stream=block_causal"]
    experts = point.get("experts", base.model.moe.num_experts or 0)
    top_k = point.get("top_k", base.model.moe.top_k)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in (experts, top_k)):
        raise ConfigError(f"{where}: experts {experts!r} / top_k {top_k!r} are not integers")
    if experts:
        over += [f"model.moe.num_experts={experts}", f"model.moe.top_k={top_k}"]
        label += f"_e{experts}k{top_k}"
    elif "experts" in point:
        over.append("model.moe.num_experts=null")
    name = f"{label}_n{depth}x{width}_d{_fmt(steps * gbs * L)}"
    if any("lr" in g for g in sweep.grids):
        name += f"_lr{lr:g}"
    canon = {"depth": depth, "width": width, "tokens": steps * gbs * L, "objective": objective,
             "block_size": None if objective == "ar" else block, "lr": lr,
             "experts": experts, "top_k": top_k if experts else 0}
    return label, name, over, canon


def expand(sweep: Sweep, overrides: Optional[List[str]] = None,
           world_size: int = 1) -> List[Run]:
    """Every run of the sweep, configs loaded and checked (at `world_size`), with N, D and C."""
    from cascade_mega.diffusion.flops import step_flops
    from cascade_mega.plan import layer_parameters
    from cascade_mega.slurm.preflight import dataset_vocab

    common = list(sweep.overrides) + list(overrides or [])
    # the base only lends defaults; its own steps must not veto a warmup meant for longer runs
    try:
        base = load_config(sweep.base, [f"run_dir={sweep.root}/_base", *common,
                                        f"train.steps={2 ** 40}"], world_size=world_size)
    except ConfigError as err:
        raise ConfigError(f"{sweep.path}: base config: {err}") from None
    vocab = base.model.vocab_size or dataset_vocab(base)
    runs, seen = [], {}
    for grid in sweep.grids:
        for point in _points(grid):
            label, name, over, canon = _resolve(sweep, point, base)
            if name in seen:
                continue  # e.g. AR at every block size
            seen[name] = True
            run_over = [*common, *over, f"name={name}", f"run_dir={sweep.root}/{name}",
                        f"tracking.group={sweep.name}", f"tracking.run_name={name}",
                        f"tracking.experiment={sweep.experiment or sweep.name}",
                        f"tracking.uri={sweep.uri}"]
            try:
                cfg = load_config(sweep.base, run_over, world_size=world_size)
            except ConfigError as err:
                raise ConfigError(f"{sweep.path}: run {name}: {err}") from None
            one_rank = replace(cfg, parallel=replace(cfg.parallel, tensor=1, expert=1,
                                                     expert_tensor=None))
            moe = cfg.model.moe
            active = moe.top_k / moe.num_experts if moe.enabled else 0.0
            n = sum(d + round(e * active) for d, e in (
                layer_parameters(one_rank, vocab, bool(on)) for on in cfg.model.moe_pattern))
            d = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
            runs.append(Run(name, label, canon, run_over, cfg, n, d,
                            step_flops(cfg, vocab) * cfg.train.steps))
    return runs

