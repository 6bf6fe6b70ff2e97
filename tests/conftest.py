"""Shared fixtures: a trained tiny model (trained once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.workloads import WorkloadConfig, load_workload


@pytest.fixture(scope="session")
def tiny() -> WorkloadConfig:
    return load_workload("tiny")


@pytest.fixture(scope="session")
def tiny_state_dict(tmp_path_factory: pytest.TempPathFactory, tiny: WorkloadConfig) -> Path:
    """A tiny model trained briefly (seconds); its path to a torchrec state dict."""
    from recserve.train import train

    path = tmp_path_factory.mktemp("tiny-model") / "model.pt"
    train(tiny, path, steps=60, progress=False)
    return path
