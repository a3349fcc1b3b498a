"""Loading a run configuration: YAML files that build on a base, dotted overrides, checked once.

A config file may name a `base:` file (relative to itself); the chain is merged base-first, then the
command-line overrides (`model.num_layers=4`). Unknown keys, wrong types and impossible combinations
raise `ConfigError` with one message naming the key, before anything expensive is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from cascade_mega.config.rules import validate
from cascade_mega.config.sections import CascadeConfig, ConfigError


# the top-level keys that are sections (mappings), not values
SECTIONS = tuple(f.name for f in dataclasses.fields(CascadeConfig)
                 if dataclasses.is_dataclass(f.default_factory if f.default_factory
                                             is not dataclasses.MISSING else None))


def _yaml_chain(path: str) -> List[dict]:
    """The YAML file and its `base:` ancestors, base first."""
    chain, seen = [], set()
    while path:
        path = os.path.abspath(path)
        if path in seen:
            raise ConfigError(f"config {path}: `base:` chain loops back to itself")
        seen.add(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            node = OmegaConf.load(path)
        except yaml.YAMLError as err:  # where and what, in one line
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config {path}:{where}: not valid YAML ({what})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {path}: not UTF-8 text") from None
        if not OmegaConf.is_dict(node):
            raise ConfigError(f"config {path}: holds a list, not a mapping of sections "
                              "(model:, train:, ...)")
        for key in SECTIONS:
            if key in node and not OmegaConf.is_dict(node[key]) and node[key] is not None:
                raise ConfigError(f"config {path}: '{key}' must be a mapping of its settings "
                                  f"({key}: then indented key: value lines), got "
                                  f"{OmegaConf.to_container(node)[key]!r}")
        base = node.pop("base", None)
        chain.append(node)
        path = os.path.join(os.path.dirname(path), base) if base else None
    return chain[::-1]


def _suggest(key: str) -> str:
    *parents, leaf = key.split(".")
    node = OmegaConf.structured(CascadeConfig)
    for p in parents:
        node = node.get(p) if p in node else None
        if node is None:
            return ""
    close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    return f" (did you mean '{'.'.join(parents + close)}'?)" if close else ""


def _explain(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{origin}: unknown config key '{key}'{_suggest(key)}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{origin}: wrong type for '{key}': {msg}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None) -> CascadeConfig:
    """Merge defaults <- YAML chain <- overrides, validate, and return a typed config object.

    world_size: the number of processes the run will have (default: the launcher's environment;
    0: not known here, the layout is checked against no world size).
    """
    cfg = OmegaConf.structured(CascadeConfig)
    for node in _yaml_chain(path) if path else []:
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as err:
            raise _explain(err, path) from None
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        if not value:
            raise ConfigError(f"override '{item}' gives '{key}' no value (write {key}=null "
                              "for none)")
        if key in cfg and OmegaConf.is_dict(cfg[key]):
            raise ConfigError(f"override '{item}': '{key}' is a section; set its keys "
                              f"({key}.NAME=VALUE)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ConfigError("'run_dir' is not set (set it in the YAML file or as run_dir=PATH)")
    obj: CascadeConfig = OmegaConf.to_object(cfg)
    if world_size is None:
        from cascade_mega.runtime.env import read_env

        world_size = read_env().world_size
    validate(obj, world_size)
    return obj


def run_dtype(cfg: CascadeConfig):
    """The torch dtype of `train.precision` on this process's device (auto: bf16 on a GPU)."""
    import torch

    from cascade_mega.runtime import device

    precision = cfg.train.precision
    if precision == "bf16" or (precision == "auto" and device.on_gpu()):
        return torch.bfloat16
    return torch.float32


def to_yaml(cfg: CascadeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_uri(text: str) -> str:
    """`http://user:password@host` (or a token as the user) -> `http://***@host`, anywhere in
    `text`: credentials in a tracking URI never reach a file, a tracking store or the console."""
    return _USERINFO.sub(r"\1***@", text)


def record_yaml(cfg: CascadeConfig) -> str:
    """The config as the run records it (run directory, checkpoints, MLflow): `to_yaml` with the
    tracking URI's credentials redacted. (A job's frozen config keeps them: the job needs them;
    MLFLOW_TRACKING_USERNAME / _PASSWORD in the job's environment keep them out of every file.)"""
    return redact_uri(to_yaml(cfg))


def config_changes(old_yaml: str, cfg: CascadeConfig) -> list:
    """[(key, old value, new value)] for every setting of `cfg` that differs from the config in
    `old_yaml` (e.g. the one a checkpoint was saved under), dotted keys in config order."""
    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            if isinstance(value, dict) and value and not str(next(iter(value))).isdigit():
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    old = flat(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = flat(OmegaConf.to_container(OmegaConf.create(record_yaml(cfg))))  # as it was recorded
    return [(k, old.get(k), v) for k, v in new.items() if old.get(k) != v]
