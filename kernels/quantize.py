"""The storage format of an embedding table, defined once: the storage dtypes, row-wise
int8/int4 quantization, int4 packing, and the error each dtype may introduce.

Export writes tables with these functions and the lookup kernels read what they write.

Storage per dtype (``[rows, dim]`` table)::

    fp32 / fp16 / bf16   weight [rows, dim] in that dtype
    int8                 weight uint8 [rows, dim]            + scale, bias fp32 [rows]
    int4                 weight uint8 [rows, ceil(dim / 2)]  + scale, bias fp32 [rows]

A quantized row keeps an fp32 ``scale`` and ``bias`` (the row minimum); element ``w`` is
stored as ``q = round((w - bias) / scale)`` with ``q`` in [0, 2^bits - 1] and read back as
``q * scale + bias``. ``scale = (row max - row min) / (2^bits - 1)``; a constant row gets
scale 0 and codes 0, so it reads back exactly. The error per element is at most half a
step (plus fp32 rounding of ``q * scale + bias``)::

    |w - dequantize(quantize(w))| <= (row max - row min) / (2 (2^bits - 1))

int4 packs two codes per byte: element ``2j`` in the low nibble of byte ``j``, element
``2j + 1`` in the high nibble; an odd dim leaves the last high nibble zero.

Example (one row, int8)::

    >>> q, scale, bias = quantize_rowwise(torch.tensor([[-1.0, 0.5, 1.0]]), "int8")
    >>> q.tolist(), scale.tolist(), bias.tolist()
    ([[0, 191, 255]], [0.007843137718737125], [-1.0])
"""

from __future__ import annotations

import torch

DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZED = ("int8", "int4")
QUANT_BITS = {"fp32": 0, "fp16": 0, "bf16": 0, "int8": 8, "int4": 4}  # 0: not quantized
ELEMENT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}  # bits per stored element
SCALE_BIAS_BYTES = 8  # per quantized row: fp32 scale + fp32 bias
# unit roundoff (half an ulp, relative) and smallest subnormal step of the float dtypes
_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
_SUBNORMAL_STEP = {"fp32": 2.0**-149, "fp16": 2.0**-24, "bf16": 2.0**-133}


def _check(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"storage dtype must be one of {DTYPES}, got {dtype!r}")


def weight_dtype(dtype: str) -> torch.dtype:
    """torch dtype of the stored weight tensor."""
    _check(dtype)
    return torch.uint8 if dtype in QUANTIZED else FLOAT_DTYPES[dtype]


def weight_cols(dim: int, dtype: str) -> int:
    """Columns of the stored weight tensor of a ``dim``-wide table."""
    _check(dtype)
    return (dim + 1) // 2 if dtype == "int4" else dim


def stored_row_bytes(dim: int, dtype: str) -> int:
    """Bytes one row takes in storage: weight plus, quantized, its scale and bias."""
    extra = SCALE_BIAS_BYTES if dtype in QUANTIZED else 0
    return weight_cols(dim, dtype) * weight_dtype(dtype).itemsize + extra


def quantize_rowwise(w: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [R, D] -> (uint8 codes [R, weight_cols(D)], fp32 scale [R], fp32 bias [R])."""
    if dtype not in QUANTIZED:
        raise ValueError(f"quantize_rowwise: dtype must be one of {QUANTIZED}, got {dtype!r}")
    levels = (1 << QUANT_BITS[dtype]) - 1
    w = w.float()
    lo = w.amin(dim=1)  # [R]
    hi = w.amax(dim=1)  # [R]
    scale = (hi - lo) / levels  # [R]; 0 for a constant row
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # [R]
    # one fp32 temporary the size of the input, then in place
    q = (w - lo[:, None]).div_(safe[:, None]).round_().clamp_(0, levels).to(torch.uint8)  # [R, D]
    if dtype == "int4":
        q = pack_int4(q)  # [R, ceil(D/2)]
    return q.contiguous(), scale.contiguous(), lo.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, [R, D] -> [R, ceil(D/2)], two per byte (low nibble first)."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))  # [R, D + 1]
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """[R, ceil(D/2)] -> uint8 codes [R, D]."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], 2 * packed.shape[1])  # [R, 2*ceil(D/2)]
    return out[:, :dim]


def dequantize(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, dtype: str, dim: int) -> torch.Tensor:
    """Inverse of :func:`quantize_rowwise`: fp32 [R, D]."""
    if dtype == "int4":
        q = unpack_int4(q, dim)
    return q.float() * scale[:, None] + bias[:, None]


def error_bound(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """The largest error per element that storing ``w`` [R, D] as ``dtype`` may introduce:
    fp32 [R, D] (broadcast along D for the quantized dtypes, whose bound is per row)."""
    _check(dtype)
    w = w.float()
    if dtype in FLOAT_DTYPES:  # round to nearest: half an ulp, relative, or half a subnormal step
        return torch.maximum(w.abs() * _ROUNDOFF[dtype], torch.full_like(w, _SUBNORMAL_STEP[dtype] / 2))
    levels = (1 << QUANT_BITS[dtype]) - 1
    span = w.amax(dim=1) - w.amin(dim=1)  # [R]
    # half a quantization step, plus fp32 rounding of q * scale + bias
    per_row = span / (2 * levels) + 4 * torch.finfo(torch.float32).eps * w.abs().amax(dim=1)  # [R]
    return per_row[:, None].expand_as(w)
