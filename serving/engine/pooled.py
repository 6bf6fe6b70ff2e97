"""Pooled embeddings between shards and the tower, in their wire dtype.

A shard's output leaves the GPU already in the wire dtype (float32, float16 or bfloat16;
16-bit halves the device-to-host and inter-process bytes). numpy has no bfloat16, so a
bfloat16 array travels as its raw bits in a uint16 array; :func:`to_torch` turns any of
the three back into the torch dtype it was::

    to_numpy(torch.tensor([1.5], dtype=torch.bfloat16))  ->  array([16320], dtype=uint16)
    to_torch(that)                                        ->  tensor([1.5], dtype=torch.bfloat16)
"""

from __future__ import annotations

import numpy as np
import torch

EMBEDDING_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def embedding_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """float32/float16/bfloat16 (a torch dtype or one of EMBEDDING_DTYPES' names)."""
    if isinstance(dtype, str):
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"output dtype: must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}")
        return EMBEDDING_DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"output dtype: must be torch.float32, float16 or bfloat16, got {dtype}")
    return dtype


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host tensor as numpy: float32/float16 as they are, bfloat16 as uint16 bits (a view)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def to_torch(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_numpy` (no copy): uint16 arrays are bfloat16 bits."""
    if isinstance(a, torch.Tensor):
        return a
    if not a.flags.writeable:  # results from the object store are read-only
        a = a.copy()
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if a.dtype not in (np.float32, np.float16):
        raise ValueError(f"pooled embeddings: expected float32, float16 or uint16 (bfloat16 bits), got {a.dtype}")
    return torch.from_numpy(a)
