"""Table-batched pooled embedding lookup (TBE): all tables of a shard in one launch.

Input layout (as FBGEMM's TBE)::

    T tables, batch B.  indices: flat, table-major; offsets: [T*B + 1]
    bag (t, b) = indices[offsets[t*B + b] : offsets[t*B + b + 1]]

    e.g. T=2, B=2, table 0 bags [3, 1] and [], table 1 bags [7] and [2, 2]:
    indices = [3, 1, 7, 2, 2]        offsets = [0, 2, 2, 3, 5]
    output  = [B, dim_0 + dim_1] float32, row b = [pool(bag(0, b)) | pool(bag(1, b))]

Storage per table (the model package's layout): fp32/fp16/bf16 ``[rows, dim]``, or row-wise
quantized uint8 ``[rows, dim]`` (int8) / ``[rows, ceil(dim/2)]`` (int4, element 2j in the low
nibble of byte j) with fp32 ``scale`` and ``bias`` ``[rows]``: value = q * scale + bias.
Accumulation is fp32; empty bags give zeros; mean divides by the bag length.

Tables of one storage dtype are packed into one flat buffer and looked up by one launch;
a shard whose tables mix storage dtypes makes one launch per dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.errors import BackendUnavailableError, IndexOutOfRangeError, KernelInputError
from kernels.quantize import DTYPES, unpack_int4
from kernels.quantize import FLOAT_DTYPES as _FLOAT_DTYPES
from kernels.quantize import QUANT_BITS as _QUANT_BITS
from kernels.registry import REFERENCE, Choice, Winners, pow2_bucket

OP = "embedding_bag"
_META_COLS = 8  # base, row stride, dim, output column, scale/bias row base, global table id, rows, pad

TEMPLATES = ("per_bag", "multi_bag", "split_bag")
DEFAULT_CONFIGS = {
    "per_bag": {"BLOCK_N": 8, "BLOCK_D": 128, "num_warps": 4, "num_stages": 2},
    "multi_bag": {"BAGS": 8, "BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 4, "num_stages": 2},
    "split_bag": {"SPLITS": 4, "BLOCK_N": 2, "BLOCK_D": 128, "num_warps": 1, "num_stages": 1},
}


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
        if self.dtype in _FLOAT_DTYPES:
            if w.dtype != _FLOAT_DTYPES[self.dtype] or w.shape[1] != self.dim:
                raise KernelInputError(
                    f"TableWeights.weight: {self.dtype} table must be {_FLOAT_DTYPES[self.dtype]} "
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


# ----------------------------------------------------------------------------- quantization


def dequantize_rows(table: TableWeights, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a table as fp32 [len(ids), dim]."""
    q = table.weight.index_select(0, ids)  # [n, cols]
    if table.dtype in _FLOAT_DTYPES:
        return q.float()
    if table.dtype == "int4":
        q = unpack_int4(q, table.dim)  # [n, dim]
    return q.float() * table.scale.index_select(0, ids)[:, None] + table.bias.index_select(0, ids)[:, None]


# ----------------------------------------------------------------------------- reference


def embedding_bag_reference(
    tables: Sequence[TableWeights],
    indices: torch.Tensor,  # [N] int32/int64, table-major
    offsets: torch.Tensor,  # [T*B + 1]
    per_sample_weights: torch.Tensor | None = None,  # [N] fp32
    *,
    pooling: str = "sum",
) -> torch.Tensor:
    """Plain torch: one F.embedding_bag per table. Returns [B, sum dims] fp32."""
    T = len(tables)
    B = (offsets.numel() - 1) // T
    bounds = offsets[::B].to(torch.int64).tolist()  # [T + 1] where each table's ids start
    outs = []
    for t, table in enumerate(tables):
        lo, hi = bounds[t], bounds[t + 1]
        ids = indices[lo:hi].to(torch.int64)  # [n_t]
        local = (offsets[t * B : t * B + B + 1].to(torch.int64) - lo)  # [B + 1]
        psw = per_sample_weights[lo:hi] if per_sample_weights is not None else None
        if table.dtype == "fp32" and not (pooling == "mean" and psw is not None):
            pooled = F.embedding_bag(ids, table.weight, local, mode=pooling, per_sample_weights=psw,
                                     include_last_offset=True)
        else:
            rows = dequantize_rows(table, ids)  # [n_t, dim] fp32
            pooled = F.embedding_bag(torch.arange(ids.numel(), device=ids.device), rows, local,
                                     mode="sum", per_sample_weights=psw, include_last_offset=True)
            if pooling == "mean":
                counts = (local[1:] - local[:-1]).clamp_min(1).to(torch.float32)  # [B]
                pooled = pooled / counts[:, None]
        outs.append(pooled.float())  # [B, dim_t]
    return torch.cat(outs, dim=1)  # [B, sum dims]


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _load_rows(W, SB, row_off, row_idx, d, rmask, mask, QUANT: tl.constexpr, EVICT: tl.constexpr):
    """Rows as fp32 [n, BLOCK_D]: row_off = element/byte offset of each row, row_idx = its
    global row (for scale/bias), d = the columns, rmask = [n] live rows, mask = [n, BLOCK_D].
    SB holds each row's fp32 scale and bias as one int64 (one 8-byte load per row)."""
    # EVICT: rows are read once; "evict_first" keeps them from pushing ids/offsets out of L2
    if QUANT == 0:
        if EVICT:
            v = tl.load(W + row_off[:, None] + d[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            v = tl.load(W + row_off[:, None] + d[None, :], mask=mask, other=0.0)
        v = v.to(tl.float32)
    else:
        if QUANT == 8:
            if EVICT:
                q = tl.load(W + row_off[:, None] + d[None, :], mask=mask, other=0, eviction_policy="evict_first")
            else:
                q = tl.load(W + row_off[:, None] + d[None, :], mask=mask, other=0)
        else:
            byte = tl.load(W + row_off[:, None] + (d // 2)[None, :], mask=mask, other=0)
            q = (byte >> ((d % 2) * 4).to(tl.uint8)[None, :]) & 0xF
        sb = tl.load(SB + row_idx, mask=rmask, other=0)  # [n] int64: bias bits << 32 | scale bits
        s = (sb & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        b = (sb >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        v = q.to(tl.float32) * s[:, None] + b[:, None]
        v = tl.where(mask, v, 0.0)
    return v


@triton.jit(do_not_specialize=["B", "first_bag", "N", "TB"])
def _eb_per_bag_kernel(
    W, SB, META, IDX, OFF, PSW, OUT, ERR,
    B, first_bag, out_stride, N, TB,
    QUANT: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr, ALIGN: tl.constexpr, CONTIG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVICT: tl.constexpr, CHECK: tl.constexpr,
):
    """One program per (bag, column block); BLOCK_N ids of the bag gathered per step."""
    pid = tl.program_id(0)  # bag within this dtype group: t * B + b
    pid_d = tl.program_id(1)
    t = pid // B
    b = pid - t * B
    base = tl.load(META + t * 8 + 0)
    stride = tl.load(META + t * 8 + 1)
    dim = tl.load(META + t * 8 + 2)
    out_col = tl.load(META + t * 8 + 3)
    row_base = tl.load(META + t * 8 + 4)
    if CONTIG:  # the group's tables are consecutive global tables: no dependent load
        bag = first_bag + pid
    else:
        bag = tl.load(META + t * 8 + 5) * B + b
    start = tl.load(OFF + bag).to(tl.int64)
    end = tl.load(OFF + bag + 1).to(tl.int64)
    if CHECK:  # in-kernel validation: a bad bag reads nothing, a bad id is masked and reported
        rows_t = tl.load(META + t * 8 + 6)
        ok_off = (start >= 0) & (start <= end) & (end <= N) & ((bag != 0) | (start == 0)) & ((bag != TB - 1) | (end == N))
        end = tl.where(ok_off, end, start)
        first_bad = tl.zeros([], dtype=tl.int64) + N
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = d < dim
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(start, end, BLOCK_N):
        n = i + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        nmask = n < end
        idx = tl.load(IDX + n, mask=nmask, other=0).to(tl.int64)
        if CHECK:
            bad = nmask & ((idx < 0) | (idx >= rows_t))
            first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, n, N), axis=0))
            nmask = nmask & (bad == 0)
            idx = tl.where(bad, 0, idx)
        row_off = tl.multiple_of(base + idx * stride, ALIGN)  # [BLOCK_N]
        mask = nmask[:, None] & dmask[None, :]
        v = _load_rows(W, SB, row_off, row_base + idx, d, nmask, mask, QUANT, EVICT)  # [BLOCK_N, BLOCK_D]
        if HAS_W:
            v = v * tl.load(PSW + n, mask=nmask, other=0.0)[:, None]
        acc += v
    pooled = tl.sum(acc, axis=0)  # [BLOCK_D]
    if MEAN:
        pooled = pooled / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(OUT + b.to(tl.int64) * out_stride + out_col + d, pooled, mask=dmask)
    if CHECK:  # -1: malformed offsets; < N: first bad id position; N: all good
        tl.store(ERR + pid * tl.num_programs(1) + pid_d, tl.where(ok_off, first_bad, -1))


@triton.jit(do_not_specialize=["B", "n_bags", "first_bag", "N", "TB"])
def _eb_multi_bag_kernel(
    W, SB, META, IDX, OFF, PSW, OUT, ERR,
    B, n_bags, first_bag, out_stride, N, TB,
    QUANT: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr, ALIGN: tl.constexpr, CONTIG: tl.constexpr,
    BAGS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVICT: tl.constexpr, CHECK: tl.constexpr,
):
    """One program per (BAGS consecutive bags, column block); each step gathers BLOCK_N ids of
    every bag at once, so BAGS * BLOCK_N independent row loads are in flight and the per-bag
    set-up (metadata, offsets) is paid once per BAGS bags. Tile rows are (bag, slot) pairs."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = tl.arange(0, BAGS * BLOCK_N)  # [R] tile row = bag slot * BLOCK_N + id slot
    slot = r % BLOCK_N
    g = pid * BAGS + r // BLOCK_N  # [R] bag within this dtype group
    gmask = g < n_bags
    t = tl.where(gmask, g // B, 0)
    b = g - (g // B) * B
    base = tl.load(META + t * 8 + 0)
    stride = tl.load(META + t * 8 + 1)
    dim = tl.load(META + t * 8 + 2)
    row_base = tl.load(META + t * 8 + 4)
    if CONTIG:
        bag = first_bag + g
    else:
        bag = tl.load(META + t * 8 + 5) * B + b
    start = tl.load(OFF + bag, mask=gmask, other=0).to(tl.int64)
    end = tl.load(OFF + bag + 1, mask=gmask, other=0).to(tl.int64)
    length = end - start  # [R]
    if CHECK:
        rows_t = tl.load(META + t * 8 + 6)
        ok_off = ((start >= 0) & (start <= end) & (end <= N) & ((bag != 0) | (start == 0))
                  & ((bag != TB - 1) | (end == N))) | (gmask == 0)
        length = tl.where(ok_off, length, 0)
        first_bad = tl.zeros([], dtype=tl.int64) + N
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = (d[None, :] < dim[:, None]) & gmask[:, None]  # [R, BLOCK_D]
    acc = tl.zeros([BAGS * BLOCK_N, BLOCK_D], dtype=tl.float32)
    max_len = tl.max(length, axis=0)
    for i in range(0, max_len, BLOCK_N):
        k = i + slot  # [R] position within the bag
        nmask = k < length
        n = start + k
        idx = tl.load(IDX + n, mask=nmask, other=0).to(tl.int64)
        if CHECK:
            bad = nmask & ((idx < 0) | (idx >= rows_t))
            first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, n, N), axis=0))
            nmask = nmask & (bad == 0)
            idx = tl.where(bad, 0, idx)
        row_off = tl.multiple_of(base + idx * stride, ALIGN)
        mask = nmask[:, None] & dmask
        v = _load_rows(W, SB, row_off, row_base + idx, d, nmask, mask, QUANT, EVICT)  # [R, BLOCK_D]
        if HAS_W:
            v = v * tl.load(PSW + n, mask=nmask, other=0.0)[:, None]
        acc += v
    pooled = tl.sum(tl.reshape(acc, [BAGS, BLOCK_N, BLOCK_D]), axis=1)  # [BAGS, BLOCK_D]
    # per-bag values again, at [BAGS] (the tile rows with slot 0)
    gb = pid * BAGS + tl.arange(0, BAGS)  # [BAGS]
    gbmask = gb < n_bags
    tb = tl.where(gbmask, gb // B, 0)
    bb = gb - (gb // B) * B
    dim_b = tl.load(META + tb * 8 + 2)
    out_col = tl.load(META + tb * 8 + 3)
    if MEAN:
        if CONTIG:
            bag_b = first_bag + gb
        else:
            bag_b = tl.load(META + tb * 8 + 5) * B + bb
        len_b = (tl.load(OFF + bag_b + 1, mask=gbmask, other=0).to(tl.int64)
                 - tl.load(OFF + bag_b, mask=gbmask, other=0).to(tl.int64))
        pooled = pooled / tl.maximum(len_b, 1).to(tl.float32)[:, None]
    out = OUT + bb.to(tl.int64)[:, None] * out_stride + out_col[:, None] + d[None, :]
    tl.store(out, pooled, mask=(d[None, :] < dim_b[:, None]) & gbmask[:, None])
    if CHECK:  # -1: malformed offsets; < N: first bad id position; N: all good
        any_bad_off = tl.max((ok_off == 0).to(tl.int32), axis=0)
        tl.store(ERR + pid * tl.num_programs(1) + pid_d, tl.where(any_bad_off > 0, -1, first_bad))


@triton.jit(do_not_specialize=["B", "first_bag", "N", "TB"])
def _eb_split_bag_kernel(
    W, SB, META, IDX, OFF, PSW, OUT, ERR,
    B, first_bag, out_stride, N, TB,
    QUANT: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr, ALIGN: tl.constexpr, CONTIG: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVICT: tl.constexpr,
    CHECK: tl.constexpr,
):
    """SPLITS programs per (bag, column block): program s takes the chunks s, s + SPLITS, ...
    of BLOCK_N ids and adds its partial sum into the (zeroed) output with an atomic add.
    Long bags (dlrmv2's 100-id table) no longer serialize on one program."""
    pid = tl.program_id(0)  # bag * SPLITS + split
    pid_d = tl.program_id(1)
    g = pid // SPLITS
    s = pid - g * SPLITS
    t = g // B
    b = g - t * B
    base = tl.load(META + t * 8 + 0)
    stride = tl.load(META + t * 8 + 1)
    dim = tl.load(META + t * 8 + 2)
    out_col = tl.load(META + t * 8 + 3)
    row_base = tl.load(META + t * 8 + 4)
    if CONTIG:
        bag = first_bag + g
    else:
        bag = tl.load(META + t * 8 + 5) * B + b
    start = tl.load(OFF + bag).to(tl.int64)
    end = tl.load(OFF + bag + 1).to(tl.int64)
    length = end - start
    if CHECK:
        rows_t = tl.load(META + t * 8 + 6)
        ok_off = (start >= 0) & (start <= end) & (end <= N) & ((bag != 0) | (start == 0)) & ((bag != TB - 1) | (end == N))
        end = tl.where(ok_off, end, start)
        first_bad = tl.zeros([], dtype=tl.int64) + N
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = d < dim
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(start + s * BLOCK_N, end, SPLITS * BLOCK_N):
        n = i + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        nmask = n < end
        idx = tl.load(IDX + n, mask=nmask, other=0).to(tl.int64)
        if CHECK:
            bad = nmask & ((idx < 0) | (idx >= rows_t))
            first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, n, N), axis=0))
            nmask = nmask & (bad == 0)
            idx = tl.where(bad, 0, idx)
        row_off = tl.multiple_of(base + idx * stride, ALIGN)  # [BLOCK_N]
        mask = nmask[:, None] & dmask[None, :]
        v = _load_rows(W, SB, row_off, row_base + idx, d, nmask, mask, QUANT, EVICT)  # [BLOCK_N, BLOCK_D]
        if HAS_W:
            v = v * tl.load(PSW + n, mask=nmask, other=0.0)[:, None]
        acc += v
    part = tl.sum(acc, axis=0)  # [BLOCK_D]
    if MEAN:
        part = part / tl.maximum(length, 1).to(tl.float32)
    # splits with no ids add nothing; skip their atomics (every bag's split 0 always writes)
    sv = d * 0 + s  # [BLOCK_D] (vector masks: the interpreter wants no 0-d ones)
    has_work = (sv * BLOCK_N < length) | (sv == 0)
    tl.atomic_add(OUT + b.to(tl.int64) * out_stride + out_col + d, part, mask=dmask & has_work, sem="relaxed")
    if CHECK:
        tl.store(ERR + pid * tl.num_programs(1) + pid_d, tl.where(ok_off, first_bad, -1))


@triton.jit(do_not_specialize=["N", "TB", "B", "T"])
def _validate_kernel(IDX, OFF, ROWS, FLAGS, N, TB, B, T, BLOCK: tl.constexpr, T_POW2: tl.constexpr):
    """One pass over ids and offsets; program p writes FLAGS[p] = [first position of an
    out-of-range id in its block (or N), 1 if its offsets are malformed else 0]."""
    pid = tl.program_id(0)
    p = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] positions
    qm = p < TB  # offsets pairs (p, p + 1)
    o0 = tl.load(OFF + p, mask=qm, other=0).to(tl.int64)
    o1 = tl.load(OFF + p + 1, mask=qm, other=0).to(tl.int64)
    bad_off = qm & ((o1 < o0) | ((p == 0) & (o0 != 0)) | ((p == TB - 1) & (o1 != N)))
    pm = p < N
    idx = tl.load(IDX + p, mask=pm, other=0).to(tl.int64)
    ts = tl.arange(0, T_POW2)  # [T_POW2]
    seg = tl.load(OFF + ts * B, mask=(ts > 0) & (ts < T), other=N + 1).to(tl.int64)  # table starts
    table = tl.sum((p[:, None] >= seg[None, :]).to(tl.int32), axis=1)  # [BLOCK] ids are table-major
    rows = tl.load(ROWS + table, mask=pm, other=0)
    bad = pm & ((idx < 0) | (idx >= rows))
    first = tl.min(tl.where(bad, p.to(tl.int64), N), axis=0)
    tl.store(FLAGS + pid * 2, first)
    tl.store(FLAGS + pid * 2 + 1, tl.max(bad_off.to(tl.int64), axis=0))


# ----------------------------------------------------------------------------- packing + launch


@dataclass
class PackedGroup:
    """Tables of one storage dtype packed for one launch."""

    dtype: str
    quant: int  # 0, 8 or 4
    weight: torch.Tensor  # flat [sum rows*stride] (fp or uint8)
    scale_bias: torch.Tensor  # int64 [sum rows]: fp32 scale bits | fp32 bias bits << 32 (dummy [1] for fp)
    meta: torch.Tensor  # int64 [T_g, 8]
    table_ids: tuple[int, ...]  # global table index of each packed table
    max_dim: int
    align: int  # largest power of two (<= 16) dividing every row offset, in elements
    meta_host: tuple[tuple[int, int], ...] = ()  # (output column, dim) per packed table


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
        quant = _QUANT_BITS[dtype]
        meta, scales, biases = [], [], []
        base = row_base = 0
        align = 16
        for i in ids:
            tw = tables[i]
            stride = int(tw.weight.shape[1])
            meta.append([base, stride, tw.dim, out_cols[i], row_base, i, tw.rows, 0])
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
            for i, row in zip(ids, meta):
                weight[row[0]:row[0] + row[6] * row[1]].copy_(tables[i].weight.reshape(-1))
        if quant:
            sb = torch.stack([torch.cat(scales), torch.cat(biases)], dim=1).to(device=device, dtype=torch.float32)
            scale_bias = sb.contiguous().view(torch.int64).reshape(-1)  # [sum rows] (little-endian: scale low)
        else:
            scale_bias = torch.zeros(1, dtype=torch.int64, device=device)
        groups.append(PackedGroup(
            dtype=dtype, quant=quant, weight=weight, scale_bias=scale_bias,
            meta=torch.tensor(meta, dtype=torch.int64, device=device), table_ids=tuple(ids),
            max_dim=max(tables[i].dim for i in ids), align=align,
            meta_host=tuple((out_cols[i], tables[i].dim) for i in ids),
        ))
    return groups


def launch(
    group: PackedGroup,
    indices: torch.Tensor,  # [N] int32/int64
    offsets: torch.Tensor,  # [T*B + 1] int32/int64
    per_sample_weights: torch.Tensor | None,  # [N] fp32
    out: torch.Tensor,  # [B, sum dims] fp32, written in this group's columns
    B: int,
    *,
    pooling: str,
    template: str,
    config: dict[str, int],
    check: bool = False,
) -> torch.Tensor | None:
    """Launch one template/config over one packed group. Without ``check`` nothing is
    validated (the class checks first). With it the kernel validates as it reads and returns
    int64 codes, one per program: -1 malformed offsets, p < N first bad id position, N fine."""
    n_bags = len(group.table_ids) * B
    if n_bags == 0:
        return None
    cfg = dict(config)
    block_d = min(cfg.pop("BLOCK_D"), triton.next_power_of_2(group.max_dim))
    num_warps, num_stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
    psw = per_sample_weights if per_sample_weights is not None else out  # dummy pointer when unweighted
    ids = group.table_ids
    contig = ids == tuple(range(ids[0], ids[0] + len(ids)))
    common = dict(QUANT=group.quant, MEAN=pooling == "mean", HAS_W=per_sample_weights is not None,
                  ALIGN=group.align, CONTIG=contig, BLOCK_D=block_d, EVICT=cfg.get("EVICT", 0),
                  num_warps=num_warps, num_stages=num_stages)
    grid_d = triton.cdiv(group.max_dim, block_d)
    n_prog = {"per_bag": n_bags, "split_bag": n_bags * cfg.get("SPLITS", 1)}.get(
        template, triton.cdiv(n_bags, cfg.get("BAGS", 1)))
    err = torch.empty(n_prog * grid_d, dtype=torch.int64, device=out.device) if check else None
    args = (group.weight, group.scale_bias, group.meta, indices, offsets, psw, out, err if check else out)
    N, TB = indices.numel(), offsets.numel() - 1
    if template == "per_bag":
        _eb_per_bag_kernel[(n_bags, grid_d)](*args, B, ids[0] * B, out.stride(0), N, TB, BLOCK_N=cfg["BLOCK_N"],
                                             CHECK=check, **common)
    elif template == "multi_bag":
        bags = cfg["BAGS"]
        _eb_multi_bag_kernel[(n_prog, grid_d)](
            *args, B, n_bags, ids[0] * B, out.stride(0), N, TB, BAGS=bags, BLOCK_N=cfg.get("BLOCK_N", 1),
            CHECK=check, **common)
    elif template == "split_bag":
        _zero_group_columns(group, out)  # partial sums are added atomically
        _eb_split_bag_kernel[(n_prog, grid_d)](
            *args, B, ids[0] * B, out.stride(0), N, TB, SPLITS=cfg["SPLITS"], BLOCK_N=cfg["BLOCK_N"],
            CHECK=check, **common)
    else:
        raise KernelInputError(f"template: unknown embedding_bag template {template!r}")
    return err


def _zero_group_columns(group: PackedGroup, out: torch.Tensor) -> None:
    cols = group.meta_host  # [(output column, dim)] of the group's tables
    if sum(dim for _, dim in cols) == out.shape[1]:
        out.zero_()
    else:
        for col, dim in cols:
            out[:, col:col + dim].zero_()


def shape_bucket(max_dim: int, batch: int, avg_pooling: float) -> str:
    """Bucket of a lookup: 'd128_p8_b512' (max dim, ids per bag, batch; powers of two)."""
    return f"d{triton.next_power_of_2(max_dim)}_p{pow2_bucket(avg_pooling)}_b{pow2_bucket(batch)}"


def triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- public module


class TableBatchedEmbeddingBag:
    """All tables of one shard replica, looked up by one launch per storage dtype.

    Built once per replica: packs and uploads the weights, reads the device's winners,
    warms the kernels up. ``backend``:
      - ``"auto"``: on CUDA the searched winner for the call's shape bucket, or the
        reference where the search found nothing faster; on CPU the reference.
      - ``"triton"``: always the Triton kernel (winner config, else a default config);
        on CPU this needs TRITON_INTERPRET=1 (tests).
      - ``"reference"``: always the torch reference (one F.embedding_bag per table).
    ``validate``:
      - ``"before_launch"`` (default): one pass over ids and offsets, one host sync, then the
        lookup; a bad id raises :class:`IndexOutOfRangeError` before any lookup runs.
      - ``"in_kernel"``: where the Triton kernel runs, it validates as it reads (a bad id is
        masked, never dereferenced) and the call raises the same errors before returning;
        this saves the separate pass and the sync between the two launches.
    """

    def __init__(
        self,
        tables: Sequence[TableWeights],
        *,
        pooling: str = "sum",
        device: torch.device | str = "cpu",
        backend: str = "auto",
        winners: Winners | None = None,
        warmup: bool = True,
        validate: str = "before_launch",
    ) -> None:
        if not tables:
            raise KernelInputError("tables: need at least one table")
        if pooling not in ("sum", "mean"):
            raise KernelInputError(f"pooling: must be 'sum' or 'mean', got {pooling!r}")
        if backend not in ("auto", "triton", "reference"):
            raise KernelInputError(f"backend: must be 'auto', 'triton' or 'reference', got {backend!r}")
        if validate not in ("before_launch", "in_kernel"):
            raise KernelInputError(f"validate: must be 'before_launch' or 'in_kernel', got {validate!r}")
        self.validate = validate
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if backend == "triton" and not triton_usable(self.device):
            raise BackendUnavailableError(
                "backend='triton' needs a CUDA device or TRITON_INTERPRET=1 for CPU tensors")
        self.pooling = pooling
        self.backend = backend
        self.dims = tuple(t.dim for t in tables)
        self.total_dim = sum(self.dims)
        self.rows = torch.tensor([t.rows for t in tables], dtype=torch.int64, device=self.device)  # [T]
        self._rows_host = [t.rows for t in tables]
        def on_device(x):
            return None if x is None else x.to(self.device).contiguous()

        if backend == "reference":
            self.groups = []
            self.tables = [TableWeights(weight=on_device(t.weight), dim=t.dim, dtype=t.dtype,
                                        scale=on_device(t.scale), bias=on_device(t.bias)) for t in tables]
        else:
            # weights are copied once, table by table, into the packed buffer; the reference
            # path then reads views of it, so the device holds each table once
            self.groups = pack_tables(tables, self.device)
            views = {}
            for g in self.groups:
                meta = g.meta.tolist()
                for i, row in zip(g.table_ids, meta):
                    base, stride, rows = row[0], row[1], row[6]
                    views[i] = g.weight[base:base + rows * stride].view(rows, stride)
            self.tables = [TableWeights(weight=views[i], dim=t.dim, dtype=t.dtype,
                                        scale=on_device(t.scale), bias=on_device(t.bias))
                           for i, t in enumerate(tables)]
        # ids are checked by one Triton pass on a GPU; on a CPU by torch ops, unless the Triton
        # backend is forced (the interpreter tests): the interpreter is a test tool and is not
        # thread-safe, so "auto" on a CPU never depends on TRITON_INTERPRET being set
        self._validate_with_triton = (self.device.type == "cuda" and backend != "reference") or (
            backend == "triton" and triton_usable(self.device))
        self.winners = winners if winners is not None else Winners.for_device(self.device)
        self._choices: dict[tuple[str, str], Choice] = {}
        if warmup and self.device.type == "cuda" and backend != "reference":
            self._warmup()

    @property
    def num_tables(self) -> int:
        return len(self.tables)

    def choice(self, group: PackedGroup, B: int, n_indices: int) -> Choice:
        """The kernel to run for this group and call shape (dict lookups only)."""
        T = self.num_tables
        bucket = shape_bucket(group.max_dim, B, n_indices / max(T * B, 1))
        key = (group.dtype, bucket)
        got = self._choices.get(key)
        if got is None:
            got = self.winners.lookup(OP, group.dtype, bucket)
            if self.backend == "triton" and got.backend != "triton":
                got = Choice("triton", "per_bag", DEFAULT_CONFIGS["per_bag"])
            elif self.backend == "auto" and self.device.type != "cuda":
                got = REFERENCE
            self._choices[key] = got
        return got

    def check_layout(self, indices, offsets, per_sample_weights) -> int:
        """Validate shapes, dtypes and devices (no device work). Returns B."""
        T = self.num_tables
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
            raise KernelInputError("indices: must be a 1-D int32 or int64 tensor")
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64):
            raise KernelInputError("offsets: must be a 1-D int32 or int64 tensor")
        if (offsets.numel() - 1) % T or offsets.numel() < T + 1:
            raise KernelInputError(
                f"offsets: length must be T*B + 1 with T={T} tables and B >= 1, got {offsets.numel()}")
        for name, x in (("indices", indices), ("offsets", offsets)):
            if x.device != self.device:
                raise KernelInputError(f"{name}: must be on {self.device}, got {x.device}")
        if per_sample_weights is not None:
            if (per_sample_weights.dtype != torch.float32 or per_sample_weights.shape != indices.shape
                    or per_sample_weights.device != self.device):
                raise KernelInputError(
                    f"per_sample_weights: must be float32 [{indices.numel()}] on {self.device}")
        return (offsets.numel() - 1) // T

    def _raise_bad_id(self, indices, offsets, B: int, p: int) -> None:
        T = self.num_tables
        t = int(torch.searchsorted(offsets[::B].to(torch.int64).cpu().contiguous(), p, right=True)) - 1
        t = min(max(t, 0), T - 1)
        raise IndexOutOfRangeError(table=t, index=int(indices[p]), rows=self._rows_host[t], position=p)

    def check_inputs(self, indices, offsets, per_sample_weights) -> int:
        """Validate shapes/dtypes/devices, the offsets and every id, before any lookup is
        launched (one host sync). Returns B."""
        T = self.num_tables
        B = self.check_layout(indices, offsets, per_sample_weights)
        N = indices.numel()
        if self._validate_with_triton:
            TB = T * B
            t_pow2 = triton.next_power_of_2(T)
            block = max(64, min(1024, 16384 // t_pow2))
            grid = triton.cdiv(max(N, TB), block)
            flags = torch.empty(grid, 2, dtype=torch.int64, device=self.device)  # per block: [first bad, offsets bad]
            _validate_kernel[(grid,)](indices, offsets, self.rows, flags, N, TB, B, T, BLOCK=block, T_POW2=t_pow2)
            first_bad, offsets_bad = torch.stack([flags[:, 0].min(), flags[:, 1].max()]).tolist()  # the one sync
            if offsets_bad:
                raise KernelInputError(
                    f"offsets: must start at 0, never decrease and end at len(indices)={N}")
            if first_bad < N:
                self._raise_bad_id(indices, offsets, B, int(first_bad))
            return B
        offs = offsets.to(torch.int64)
        seg = offs[::B]  # [T + 1] start of each table's ids
        flags = [offs[0] != 0, offs[-1] != N, (offs[1:] < offs[:-1]).any()]
        if N:
            pos = torch.arange(N, device=self.device)
            table_of = torch.bucketize(pos, seg[1:].contiguous(), right=True).clamp_(max=T - 1)  # [N]
            idx = indices.to(torch.int64)
            bad = (idx < 0) | (idx >= self.rows[table_of])  # [N]
            flags.append(bad.any())
        f = torch.stack(flags).tolist()  # the one host sync
        if f[0] or f[1] or f[2]:
            raise KernelInputError(
                f"offsets: must start at 0, never decrease and end at len(indices)={N}")
        if N and f[3]:
            p = int(bad.nonzero()[0, 0])
            t = int(table_of[p])
            raise IndexOutOfRangeError(table=t, index=int(idx[p]), rows=self._rows_host[t], position=p)
        return B

    def __call__(
        self,
        indices: torch.Tensor,  # [N] int32/int64, table-major
        offsets: torch.Tensor,  # [T*B + 1]
        per_sample_weights: torch.Tensor | None = None,  # [N] fp32
    ) -> torch.Tensor:  # [B, sum dims] fp32
        if self.validate == "in_kernel":
            B = self.check_layout(indices, offsets, per_sample_weights)
            choices = [self.choice(g, B, indices.numel()) for g in self.groups]
            if choices and all(c.backend == "triton" for c in choices):
                return self._forward_checked_in_kernel(indices, offsets, per_sample_weights, B, choices)
        B = self.check_inputs(indices, offsets, per_sample_weights)
        return self.forward_unchecked(indices, offsets, per_sample_weights, B)

    def _forward_checked_in_kernel(self, indices, offsets, per_sample_weights, B, choices) -> torch.Tensor:
        """The lookup validates as it reads: a bad bag reads nothing and a bad id is masked,
        so no out-of-range row is ever read; the call raises before returning any output."""
        N = indices.numel()
        out = torch.empty(B, self.total_dim, dtype=torch.float32, device=self.device)  # [B, sum dims]
        errs = [launch(g, indices, offsets, per_sample_weights, out, B, pooling=self.pooling,
                       template=c.template, config=c.config, check=True) for g, c in zip(self.groups, choices)]
        errs = [e for e in errs if e is not None]
        code = int(torch.cat(errs).min()) if errs else N  # the one host sync
        if code == -1 or (not errs and (int(offsets[0]) != 0 or int(offsets[-1]) != N)):
            raise KernelInputError(f"offsets: must start at 0, never decrease and end at len(indices)={N}")
        if code < N:
            self._raise_bad_id(indices, offsets, B, code)
        return out

    def forward_unchecked(self, indices, offsets, per_sample_weights, B: int) -> torch.Tensor:
        """The lookup without input checks (callers that validated already; benchmarks)."""
        if self.backend == "reference":
            return embedding_bag_reference(self.tables, indices, offsets, per_sample_weights, pooling=self.pooling)
        choices = [self.choice(g, B, indices.numel()) for g in self.groups]
        if all(c.backend == "reference" for c in choices):
            return embedding_bag_reference(self.tables, indices, offsets, per_sample_weights, pooling=self.pooling)
        out = torch.empty(B, self.total_dim, dtype=torch.float32, device=self.device)  # [B, sum dims]
        ref = None
        for g, c in zip(self.groups, choices):
            if c.backend == "triton":
                launch(g, indices, offsets, per_sample_weights, out, B,
                       pooling=self.pooling, template=c.template, config=c.config)
            else:
                if ref is None:
                    ref = embedding_bag_reference(self.tables, indices, offsets, per_sample_weights, pooling=self.pooling)
                for t in g.table_ids:
                    lo = sum(self.dims[:t])
                    out[:, lo:lo + self.dims[t]] = ref[:, lo:lo + self.dims[t]]
        return out

    def _warmup(self) -> None:
        """Compile the configs this replica can pick, on a tiny input, before serving."""
        T = self.num_tables
        configs = {(e["template"], tuple(sorted(e["config"].items())))
                   for k, e in self.winners.entries.items()
                   if k.startswith(OP + "/") and e.get("backend") == "triton"}
        if self.backend == "triton":
            configs.add(("per_bag", tuple(sorted(DEFAULT_CONFIGS["per_bag"].items()))))
        B = 2
        out = torch.empty(B, self.total_dim, dtype=torch.float32, device=self.device)
        for index_dtype in (torch.int64, torch.int32):
            indices = torch.zeros(T * B, dtype=index_dtype, device=self.device)
            offsets = torch.arange(T * B + 1, dtype=index_dtype, device=self.device)
            for g in self.groups:
                for template, cfg in configs:
                    launch(g, indices, offsets, None, out, B, pooling=self.pooling,
                           template=template, config=dict(cfg))
        torch.cuda.synchronize(self.device)
