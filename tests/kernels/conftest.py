"""Kernel tests run the Triton kernels natively on a GPU, and in Triton's CPU interpreter
(TRITON_INTERPRET=1) without one. Triton reads the variable when a kernel is decorated,
so it is set here, before any test module imports kernels/."""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "kernels.embedding_bag" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels/ was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
