"""Typed run configuration: dataclasses per section that check themselves (`sections.py`), the
rules between sections (`rules.py`), YAML files that build on a base plus dotted overrides
(`load.py`). Everything a caller needs is importable from here."""

from cascade_mega.config.load import (config_changes, load_config, record_yaml, redact_uri,
                                      run_dtype, to_yaml)
from cascade_mega.config.rules import validate
from cascade_mega.config.sections import (
    _CHOICES, ONE_PROCESS, PRECISIONS, CascadeConfig, CheckpointConfig, ConfigError,
    DataConfig, DiffusionConfig, DistillConfig, ModelConfig, OptimizerConfig, ParallelConfig,
    Section, TrackingConfig, TrainConfig, weight_keys)

__all__ = ["_CHOICES", "ONE_PROCESS", "PRECISIONS", "CascadeConfig", "CheckpointConfig",
           "ConfigError", "DataConfig", "DiffusionConfig", "DistillConfig", "ModelConfig",
           "OptimizerConfig", "ParallelConfig", "Section", "TrackingConfig", "TrainConfig",
           "config_changes", "load_config", "record_yaml", "redact_uri", "run_dtype", "to_yaml",
           "validate", "weight_keys"]
