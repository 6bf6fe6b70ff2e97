"""Embedding tables as the model package stores them, and packed for the lookup kernels.

Storage per table (the format, its dtypes and the quantizer are defined in kernels/quantize.py):
fp32/fp16/bf16 ``[rows, dim]``, or row-wise quantized uint8 ``[rows, dim]`` (int8) /
``[rows, ceil(dim/2)]`` (int4) with fp32 ``scale`` and ``bias`` ``[rows]``: value = q * scale + bias.

Tables of one storage dtype are packed into one :class:`PackedGroup` (one flat weight buffer,
one metadata row per table, named by :class:`TableMeta`), looked up by one kernel launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from kernels.errors import KernelInputError
from kernels.quantize import DTYPES, FLOAT_DTYPES, QUANT_BITS, unpack_int4

@dataclass(frozen=True)
class TableWeights:
    """One table (or a row slice of one) as stored in the model package."""

    weight: torch.Tensor  # fp32/fp16/bf16 [rows, dim] or uint8 (int8: [rows, dim]; int4: [rows, ceil(dim/2)])
    dim: int
    dtype: str  # "fp32" | "fp16" | "bf16" | "int8" | "int4"
    scale: torch.Tensor | None = None  # fp32 [rows], quantized only
    bias: torch.Tensor | None = None  # fp32 [rows], quantized only

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise KernelInputError(f"TableWeights.dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise KernelInputError(f"TableWeights.dim: must be a positive int, got {self.dim!r}")
        w = self.weight
        if w.dim() != 2:
            raise KernelInputError(f"TableWeights.weight: must be 2-D, got shape {tuple(w.shape)}")
        if self.dtype in FLOAT_DTYPES:
            if w.dtype != FLOAT_DTYPES[self.dtype] or w.shape[1] != self.dim:
                raise KernelInputError(
                    f"TableWeights.weight: {self.dtype} table must be {FLOAT_DTYPES[self.dtype]} "
                    f"[rows, {self.dim}], got {w.dtype} {tuple(w.shape)}"
                )
            if self.scale is not None or self.bias is not None:
                raise KernelInputError("TableWeights.scale/bias: only quantized tables have them")
            return
        cols = self.dim if self.dtype == "int8" else (self.dim + 1) // 2
        if w.dtype != torch.uint8 or w.shape[1] != cols:
            raise KernelInputError(
                f"TableWeights.weight: {self.dtype} table must be uint8 [rows, {cols}], "
                f"got {w.dtype} {tuple(w.shape)}"
            )
        for name in ("scale", "bias"):
            v = getattr(self, name)
            if v is None or v.dtype != torch.float32 or tuple(v.shape) != (w.shape[0],):
                got = None if v is None else (v.dtype, tuple(v.shape))
                raise KernelInputError(
                    f"TableWeights.{name}: {self.dtype} table needs float32 [{w.shape[0]}], got {got}"
                )

    @property
    def rows(self) -> int:
        return int(self.weight.shape[0])


# ----------------------------------------------------------------------------- reading rows


def dequantize_rows(table: TableWeights, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a table as fp32 [len(ids), dim]."""
    q = table.weight.index_select(0, ids)  # [n, cols]
    if table.dtype in FLOAT_DTYPES:
        return q.float()
    if table.dtype == "int4":
        q = unpack_int4(q, table.dim)  # [n, dim]
    return q.float() * table.scale.index_select(0, ids)[:, None] + table.bias.index_select(0, ids)[:, None]


# ----------------------------------------------------------------------------- packing


class TableMeta(NamedTuple):
    """One packed table's row of :attr:`PackedGroup.meta` (int64). The kernels read the same
    columns by these names (kernels/embedding_bag_kernels.py ``_table_meta``)."""

    base: int  # offset of the table's first row in the packed weight buffer, in elements
    stride: int  # elements per stored row (dim; ceil(dim/2) bytes for int4)
    dim: int  # logical embedding dim
    out_col: int  # first output column of the table
    row_base: int  # the table's first row in the group's scale/bias buffer
    table: int  # global table index (its bags are bags table*B .. table*B + B - 1)
    rows: int
    pad: int = 0  # rows of 8 int64 (64 bytes)


META_COLS = len(TableMeta._fields)


@dataclass
class PackedGroup:
    """Tables of one storage dtype packed for one launch."""

    dtype: str
    quant: int  # 0, 8 or 4
    weight: torch.Tensor  # flat [sum rows*stride] (fp or uint8)
    scale_bias: torch.Tensor  # int64 [sum rows]: fp32 scale bits | fp32 bias bits << 32 (dummy [1] for fp)
    meta: torch.Tensor  # int64 [T_g, META_COLS] on the device: one TableMeta per packed table
    table_ids: tuple[int, ...]  # global table index of each packed table
    max_dim: int
    align: int  # largest power of two (<= 16) dividing every row offset, in elements
    meta_host: tuple[TableMeta, ...] = ()  # the same rows on the host

    def table_view(self, i: int) -> torch.Tensor:
        """Packed table ``i`` of this group as a [rows, stride] view of the flat buffer."""
        m = self.meta_host[i]
        return self.weight[m.base:m.base + m.rows * m.stride].view(m.rows, m.stride)


def _pow2_divisor(x: int, cap: int = 16) -> int:
    if x == 0:
        return cap
    return min(cap, x & -x)


def pack_tables(tables: Sequence[TableWeights], device: torch.device) -> list[PackedGroup]:
    """Group tables by storage dtype and pack each group into flat device buffers."""
    out_cols = [0]
    for tw in tables:
        out_cols.append(out_cols[-1] + tw.dim)
    groups: list[PackedGroup] = []
    for dtype in DTYPES:
        ids = [i for i, tw in enumerate(tables) if tw.dtype == dtype]
        if not ids:
            continue
        quant = QUANT_BITS[dtype]
        meta: list[TableMeta] = []
        scales, biases = [], []
        base = row_base = 0
        align = 16
        for i in ids:
            tw = tables[i]
            stride = int(tw.weight.shape[1])
            meta.append(TableMeta(base=base, stride=stride, dim=tw.dim, out_col=out_cols[i], row_base=row_base,
                                  table=i, rows=tw.rows))
            align = min(align, _pow2_divisor(base), _pow2_divisor(stride))
            if quant:
                scales.append(tw.scale)
                biases.append(tw.bias)
            base += tw.rows * stride
            row_base += tw.rows
        w0 = tables[ids[0]].weight
        if len(ids) == 1 and w0.device == device and w0.is_contiguous():
            weight = w0.reshape(-1)  # one table already in place: no copy
        else:
            weight = torch.empty(base, dtype=w0.dtype, device=device)  # [sum rows*stride]
            for i, m in zip(ids, meta):
                weight[m.base:m.base + m.rows * m.stride].copy_(tables[i].weight.reshape(-1))
        if quant:
            sb = torch.stack([torch.cat(scales), torch.cat(biases)], dim=1).to(device=device, dtype=torch.float32)
            scale_bias = sb.contiguous().view(torch.int64).reshape(-1)  # [sum rows] (little-endian: scale low)
        else:
            scale_bias = torch.zeros(1, dtype=torch.int64, device=device)
        groups.append(PackedGroup(
            dtype=dtype, quant=quant, weight=weight, scale_bias=scale_bias,
            meta=torch.tensor(meta, dtype=torch.int64, device=device), table_ids=tuple(ids),
            max_dim=max(tables[i].dim for i in ids), align=align, meta_host=tuple(meta),
        ))
    return groups
