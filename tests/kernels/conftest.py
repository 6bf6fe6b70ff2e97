"""Kernel tests run the Triton kernels natively on a GPU, and in Triton's CPU interpreter
(TRITON_INTERPRET=1) without one. Triton reads the variable when a kernel is decorated,
so tests/conftest.py sets it before any test module imports triton; checked here."""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # tests/conftest.py sets TRITON_INTERPRET=1 before any test module imports triton (torchrec
    # does); a triton imported earlier has compiled-only helpers that no kernel can call here
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton.language" in sys.modules:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.cdiv, InterpretedFunction):
            raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it "
                               "first): its kernels cannot run in the interpreter")

DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
