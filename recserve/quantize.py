"""Row-wise quantization of embedding rows to int8 or int4, and back.

Each row keeps an fp32 ``scale`` and ``bias`` (the row minimum); a value is stored as
``q = round((w - bias) / scale)`` with ``q`` in [0, 2^bits - 1] and read back as
``q * scale + bias``. With ``scale = (max - min) / (2^bits - 1)`` the error per element is
at most ``scale / 2`` (plus fp32 rounding), i.e.

    |w - dequantize(quantize(w))| <= (row max - row min) / (2 * (2^bits - 1))

which :func:`error_bound` returns per row. A constant row is stored exactly (scale 0).

int4 packs two values per byte: element ``2j`` in the low nibble of byte ``j`` and
element ``2j + 1`` in the high nibble; an odd dim leaves the last high nibble zero.
"""

from __future__ import annotations

import torch

BITS = {"int8": 8, "int4": 4}


def quantize_rows(w: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [R, D] -> (uint8 weight [R, D] or [R, ceil(D/2)], fp32 scale [R], fp32 bias [R])."""
    levels = (1 << BITS[dtype]) - 1
    w = w.float()
    lo = w.min(dim=1).values  # [R]
    hi = w.max(dim=1).values  # [R]
    scale = (hi - lo) / levels  # [R]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    # one fp32 temporary the size of the chunk, then in place
    q = (w - lo[:, None]).div_(safe[:, None]).round_().clamp_(0, levels).to(torch.uint8)  # [R, D]
    q[scale == 0] = 0
    if dtype == "int4":
        q = pack_int4(q)
    return q, scale.contiguous(), lo.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values < 16, [R, D] -> [R, ceil(D/2)], two per byte (low nibble first)."""
    r, d = q.shape
    if d % 2:
        q = torch.cat([q, torch.zeros(r, 1, dtype=torch.uint8)], dim=1)  # [R, D + 1]
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """[R, ceil(D/2)] -> uint8 [R, D]."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1)  # [R, 2*ceil(D/2)]
    return out[:, :dim]


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, dtype: str, dim: int) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: fp32 [R, D]."""
    if dtype == "int4":
        q = unpack_int4(q, dim)
    return q.float() * scale[:, None] + bias[:, None]


def error_bound(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """Largest error per row that quantize/dequantize may introduce: fp32 [R]."""
    levels = (1 << BITS[dtype]) - 1
    w = w.float()
    span = w.max(dim=1).values - w.min(dim=1).values
    # half a quantization step, plus fp32 rounding of q * scale + bias
    return span / (2 * levels) + 4 * torch.finfo(torch.float32).eps * w.abs().max(dim=1).values
