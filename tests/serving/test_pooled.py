"""Pooled embeddings in their wire dtype: numpy round trips, bfloat16 as uint16 bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.engine.pooled import embedding_dtype, to_numpy, to_torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_wire_dtype_survives_numpy_unchanged(dtype):
    t = torch.randn(3, 5).to(dtype)
    a = to_numpy(t)
    assert a.dtype == {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[dtype]
    back = to_torch(a)
    assert back.dtype == dtype and torch.equal(back, t)


def test_unknown_dtypes_are_named():
    with pytest.raises(ValueError, match="output dtype"):
        embedding_dtype("int8")
    with pytest.raises(ValueError, match="int64"):
        to_torch(np.zeros(3, np.int64))
