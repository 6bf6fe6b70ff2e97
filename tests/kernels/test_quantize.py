"""The storage format (kernels/quantize.py): row-wise quantization within its stated bound,
int4 packing, and the byte counts the planner uses agree with what is stored."""

import pytest
import torch

from kernels.quantize import (
    DTYPES,
    ELEMENT_BITS,
    FLOAT_DTYPES,
    QUANTIZED,
    dequantize,
    error_bound,
    pack_int4,
    quantize_rowwise,
    unpack_int4,
    weight_cols,
    weight_dtype,
)
from sharding.types import DTYPES as PLAN_DTYPES
from sharding.types import element_bytes, row_bytes


def _table(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g) * 10  # rows of varied span


def _store(w: torch.Tensor, dtype: str) -> list[torch.Tensor]:
    """The tensors a package stores for ``w`` in ``dtype``."""
    if dtype in QUANTIZED:
        return list(quantize_rowwise(w, dtype))
    return [w.to(FLOAT_DTYPES[dtype])]


def _load(stored: list[torch.Tensor], dtype: str, dim: int) -> torch.Tensor:
    return dequantize(*stored, dtype, dim) if dtype in QUANTIZED else stored[0].float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 7, 16, 33])
def test_every_storage_dtype_stays_within_its_stated_error_bound(dtype, dim):
    w = _table(500, dim, dim)
    w[3] = 0.25  # a constant row
    w[4] = 1e-7  # below fp16's normal range
    stored = _store(w, dtype)
    assert stored[0].dtype == weight_dtype(dtype) and stored[0].shape == (500, weight_cols(dim, dtype))
    back = _load(stored, dtype, dim)
    assert torch.all((back - w).abs() <= error_bound(w, dtype))
    assert torch.equal(back[3], w[3])  # a constant row reads back exactly, in every dtype


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "int4"])
def test_storage_actually_loses_precision_so_the_bound_is_meaningful(dtype):
    w = _table(100, 16, 0)
    err = (_load(_store(w, dtype), dtype, 16) - w).abs()
    bound = error_bound(w, dtype)
    assert err.max() > 0
    assert err.max() > bound.max() / 10  # the bound is not loose by orders of magnitude


def test_a_constant_row_is_stored_with_scale_zero_and_codes_zero():
    q, scale, bias = quantize_rowwise(torch.full((1, 5), -3.5), "int8")
    assert q.tolist() == [[0] * 5] and scale.tolist() == [0.0] and bias.tolist() == [-3.5]


@pytest.mark.parametrize("rows", [0, 9])
@pytest.mark.parametrize("dim", [1, 2, 5, 8])
def test_int4_packing_round_trips_low_nibble_first(dim, rows):
    q = torch.randint(0, 16, (rows, dim), dtype=torch.uint8, generator=torch.Generator().manual_seed(dim))
    packed = pack_int4(q)
    assert packed.shape == (rows, (dim + 1) // 2)
    assert torch.equal(unpack_int4(packed, dim), q)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0])


def test_the_planner_knows_exactly_the_kernels_storage_dtypes():
    assert tuple(PLAN_DTYPES) == DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 64, 127])
def test_the_planners_row_bytes_are_the_bytes_a_stored_row_takes(dtype, dim):
    stored = _store(_table(4, dim, 1), dtype)
    assert row_bytes(dim, dtype) * 4 == sum(t.numel() * t.element_size() for t in stored)
    assert element_bytes(dtype) == ELEMENT_BITS[dtype] / 8
