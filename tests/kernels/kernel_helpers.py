"""Builders of small, awkward lookup inputs shared by the kernel tests."""

from __future__ import annotations

import torch

from kernels.embedding_bag import TableWeights
from kernels.quantize import quantize_rowwise

FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# max |kernel - reference| allowed, per storage dtype. Both sides dequantize/upcast the same
# stored values and accumulate in fp32; only the summation order differs.
TOL = {"fp32": 1e-5, "fp16": 1e-5, "bf16": 1e-5, "int8": 1e-4, "int4": 1e-4}


def make_table(dtype: str, rows: int, dim: int, gen: torch.Generator) -> TableWeights:
    w = torch.randn(rows, dim, generator=gen)  # [rows, dim]
    if dtype in FLOAT:
        return TableWeights(weight=w.to(FLOAT[dtype]), dim=dim, dtype=dtype)
    q, scale, bias = quantize_rowwise(w, dtype)
    return TableWeights(weight=q, dim=dim, dtype=dtype, scale=scale, bias=bias)


def make_batch(
    rows: list[int], B: int, gen: torch.Generator, *, max_len: int = 5, index_dtype=torch.int64,
    empty_bags: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged bags (lengths 0..max_len, some forced empty), table-major.
    Returns indices [N], offsets [T*B + 1], per_sample_weights [N]."""
    T = len(rows)
    lengths = torch.randint(0, max_len + 1, (T * B,), generator=gen)  # [T*B]
    if empty_bags:
        lengths[:: 3] = 0
    ids = [torch.randint(0, rows[t], (int(lengths[t * B:(t + 1) * B].sum()),), generator=gen) for t in range(T)]
    indices = torch.cat(ids).to(index_dtype)  # [N]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(index_dtype)  # [T*B + 1]
    psw = torch.rand(indices.numel(), generator=gen)  # [N]
    return indices, offsets, psw
