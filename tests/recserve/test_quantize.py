import pytest
import torch

from recserve.quantize import dequantize_rows, error_bound, pack_int4, quantize_rows, unpack_int4


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("dim", [1, 7, 16, 33])
def test_row_wise_quantization_stays_within_the_stated_bound(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    w = torch.randn(500, dim, generator=g) * torch.rand(500, 1, generator=g) * 10
    w[3] = 0.25  # a constant row is stored exactly
    q, scale, bias = quantize_rows(w, dtype)
    assert q.dtype == torch.uint8 and q.shape == (500, dim if dtype == "int8" else (dim + 1) // 2)
    back = dequantize_rows(q, scale, bias, dtype, dim)
    err = (back - w).abs().max(dim=1).values
    assert torch.all(err <= error_bound(w, dtype))
    assert torch.equal(back[3], w[3])


def test_quantization_actually_loses_precision_so_the_bound_is_meaningful():
    w = torch.randn(100, 16, generator=torch.Generator().manual_seed(0))
    q, scale, bias = quantize_rows(w, "int4")
    assert (dequantize_rows(q, scale, bias, "int4", 16) - w).abs().max() > 1e-3


@pytest.mark.parametrize("dim", [1, 2, 5, 8])
def test_int4_packing_round_trips_low_nibble_first(dim):
    q = torch.randint(0, 16, (9, dim), dtype=torch.uint8)
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed, dim), q)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0])
