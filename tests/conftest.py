"""Shared fixtures. Tests run the real megatron-core layers on CPU with gloo (world of one here)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from test runs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture(scope="session", autouse=True)
def data_home(tmp_path_factory):
    """One copy of the builtin dataset for the whole session, in the repo's cache (reused)."""
    os.environ.setdefault("CASCADE_DATA_HOME", os.path.join(ROOT, ".cache", "data"))
    return os.environ["CASCADE_DATA_HOME"]


@pytest.fixture(scope="session")
def megatron():
    """megatron-core parallel state for a single CPU process (TP = PP = 1)."""
    from cascade_mega.config import ParallelConfig
    from cascade_mega.runtime import distributed

    distributed.init(ParallelConfig(), seed=1234)
    yield
