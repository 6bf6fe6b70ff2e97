"""The Triton kernels of the table-batched lookup, and their launcher.

Three templates over one :class:`~kernels.storage.PackedGroup` (the search picks one and its
launch config per device and shape bucket):
  - ``per_bag``: one program per (bag, column block), BLOCK_N ids gathered per step;
  - ``multi_bag``: one program per BAGS consecutive bags, BAGS * BLOCK_N row loads in flight;
  - ``split_bag``: SPLITS programs per bag, partial sums added atomically (long bags).
With ``CHECK`` a template validates as it reads: a bag with malformed offsets reads nothing,
an out-of-range id is masked (never dereferenced), and each program reports an error code.
``_validate_kernel`` is the separate one-pass check that runs before a launch otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import KernelInputError
from kernels.storage import META_COLS, PackedGroup, TableMeta

TEMPLATES = ("per_bag", "multi_bag", "split_bag")
DEFAULT_CONFIGS = {
    "per_bag": {"BLOCK_N": 8, "BLOCK_D": 128, "num_warps": 4, "num_stages": 2},
    "multi_bag": {"BAGS": 8, "BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 4, "num_stages": 2},
    "split_bag": {"SPLITS": 4, "BLOCK_N": 2, "BLOCK_D": 128, "num_warps": 1, "num_stages": 1},
}

# the metadata columns, named as on the host (storage.TableMeta)
_META_ROW = tl.constexpr(META_COLS)
_M_BASE = tl.constexpr(TableMeta._fields.index("base"))
_M_STRIDE = tl.constexpr(TableMeta._fields.index("stride"))
_M_DIM = tl.constexpr(TableMeta._fields.index("dim"))
_M_OUT_COL = tl.constexpr(TableMeta._fields.index("out_col"))
_M_ROW_BASE = tl.constexpr(TableMeta._fields.index("row_base"))
_M_TABLE = tl.constexpr(TableMeta._fields.index("table"))
_M_ROWS = tl.constexpr(TableMeta._fields.index("rows"))


@triton.jit
def _table_meta(meta_ptr, t):
    """Row ``t`` (a scalar or a vector of packed-table indices) of the group's metadata:
    (base, stride, dim, out_col, row_base, table, rows). Unused columns are never loaded
    (the compiler drops loads whose values are unused)."""
    row = meta_ptr + t * _META_ROW
    return (tl.load(row + _M_BASE), tl.load(row + _M_STRIDE), tl.load(row + _M_DIM), tl.load(row + _M_OUT_COL),
            tl.load(row + _M_ROW_BASE), tl.load(row + _M_TABLE), tl.load(row + _M_ROWS))


@triton.jit
def _bag_bounds(offsets_ptr, g, table, b, B, first_bag, N, TB, CONTIG: tl.constexpr):
    """Bag ``g`` of the group (bag ``b`` of global table ``table``): its ids' [start, end) and
    whether its offsets are well formed (start 0 first, end N last, never decreasing)."""
    if CONTIG:  # the group's tables are consecutive global tables: no dependent load
        bag = first_bag + g
    else:
        bag = table * B + b
    start = tl.load(offsets_ptr + bag).to(tl.int64)
    end = tl.load(offsets_ptr + bag + 1).to(tl.int64)
    ok = ((start >= 0) & (start <= end) & (end <= N) & ((bag != 0) | (start == 0))
          & ((bag != TB - 1) | (end == N)))
    return start, end, ok


@triton.jit
def _load_rows(weight_ptr, scale_bias_ptr, row_off, row_idx, d, rmask, mask, QUANT: tl.constexpr,
               EVICT: tl.constexpr):
    """Rows as fp32 [n, BLOCK_D]: row_off = element/byte offset of each row, row_idx = its
    global row (for scale/bias), d = the columns, rmask = [n] live rows, mask = [n, BLOCK_D].
    scale_bias_ptr holds each row's fp32 scale and bias as one int64 (one 8-byte load per row).
    EVICT: the eviction policy of the row loads ("evict_first": rows are read once, so they do
    not push ids/offsets out of L2; "": the default)."""
    if QUANT == 0:
        v = tl.load(weight_ptr + row_off[:, None] + d[None, :], mask=mask, other=0.0,
                    eviction_policy=EVICT).to(tl.float32)
    else:
        if QUANT == 8:
            q = tl.load(weight_ptr + row_off[:, None] + d[None, :], mask=mask, other=0, eviction_policy=EVICT)
        else:
            byte = tl.load(weight_ptr + row_off[:, None] + (d // 2)[None, :], mask=mask, other=0)
            q = (byte >> ((d % 2) * 4).to(tl.uint8)[None, :]) & 0xF
        sb = tl.load(scale_bias_ptr + row_idx, mask=rmask, other=0)  # [n] int64: bias bits << 32 | scale bits
        s = (sb & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        b = (sb >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        v = q.to(tl.float32) * s[:, None] + b[:, None]
        v = tl.where(mask, v, 0.0)
    return v


@triton.jit
def _gather(weight_ptr, scale_bias_ptr, indices_ptr, psw_ptr, n, nmask, d, dmask, base, stride, row_base, rows,
            first_bad, N, QUANT: tl.constexpr, HAS_W: tl.constexpr, ALIGN: tl.constexpr, EVICT: tl.constexpr,
            CHECK: tl.constexpr):
    """One step of a bag loop: the (weighted) rows of the ids at positions ``n`` ([R]) as
    fp32 [R, BLOCK_D]; dmask broadcasts to [R, BLOCK_D]. With CHECK an id outside [0, rows)
    is masked (never read) and ``first_bad`` keeps the first such position (else N)."""
    idx = tl.load(indices_ptr + n, mask=nmask, other=0).to(tl.int64)
    if CHECK:
        bad = nmask & ((idx < 0) | (idx >= rows))
        first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, n, N), axis=0))
        nmask = nmask & (bad == 0)
        idx = tl.where(bad, 0, idx)
    row_off = tl.multiple_of(base + idx * stride, ALIGN)  # [R]
    v = _load_rows(weight_ptr, scale_bias_ptr, row_off, row_base + idx, d, nmask, nmask[:, None] & dmask,
                   QUANT, EVICT)  # [R, BLOCK_D]
    if HAS_W:
        v = v * tl.load(psw_ptr + n, mask=nmask, other=0.0)[:, None]
    return v, first_bad


@triton.jit(do_not_specialize=["B", "first_bag", "N", "TB"])
def _eb_per_bag_kernel(
    weight_ptr, scale_bias_ptr, meta_ptr, indices_ptr, offsets_ptr, psw_ptr, out_ptr, err_ptr,
    B, first_bag, out_stride, N, TB,
    QUANT: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr, ALIGN: tl.constexpr, CONTIG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVICT: tl.constexpr, CHECK: tl.constexpr,
):
    """One program per (bag, column block); BLOCK_N ids of the bag gathered per step."""
    pid = tl.program_id(0)  # bag within this dtype group: t * B + b
    pid_d = tl.program_id(1)
    t = pid // B
    b = pid - t * B
    base, stride, dim, out_col, row_base, table, rows = _table_meta(meta_ptr, t)
    start, end, ok_off = _bag_bounds(offsets_ptr, pid, table, b, B, first_bag, N, TB, CONTIG)
    if CHECK:  # a bag with bad offsets reads nothing
        end = tl.where(ok_off, end, start)
    first_bad = tl.zeros([], dtype=tl.int64) + N
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = d < dim
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(start, end, BLOCK_N):
        n = i + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        v, first_bad = _gather(weight_ptr, scale_bias_ptr, indices_ptr, psw_ptr, n, n < end, d, dmask[None, :],
                               base, stride, row_base, rows, first_bad, N, QUANT, HAS_W, ALIGN, EVICT, CHECK)
        acc += v  # [BLOCK_N, BLOCK_D]
    pooled = tl.sum(acc, axis=0)  # [BLOCK_D]
    if MEAN:
        pooled = pooled / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out_ptr + b.to(tl.int64) * out_stride + out_col + d, pooled, mask=dmask)
    if CHECK:  # -1: malformed offsets; < N: first bad id position; N: all good
        tl.store(err_ptr + pid * tl.num_programs(1) + pid_d, tl.where(ok_off, first_bad, -1))


@triton.jit(do_not_specialize=["B", "n_bags", "first_bag", "N", "TB"])
def _eb_multi_bag_kernel(
    weight_ptr, scale_bias_ptr, meta_ptr, indices_ptr, offsets_ptr, psw_ptr, out_ptr, err_ptr,
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
    g = tl.where(gmask, g, 0)  # lanes past the group's bags read bag 0 and are masked below
    t = g // B
    b = g - t * B
    base, stride, dim, _, row_base, table, rows = _table_meta(meta_ptr, t)
    start, end, ok_off = _bag_bounds(offsets_ptr, g, table, b, B, first_bag, N, TB, CONTIG)
    length = tl.where(gmask, end - start, 0)  # [R]
    if CHECK:
        ok_off = ok_off | (gmask == 0)
        length = tl.where(ok_off, length, 0)
    first_bad = tl.zeros([], dtype=tl.int64) + N
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = (d[None, :] < dim[:, None]) & gmask[:, None]  # [R, BLOCK_D]
    acc = tl.zeros([BAGS * BLOCK_N, BLOCK_D], dtype=tl.float32)
    max_len = tl.max(length, axis=0)
    for i in range(0, max_len, BLOCK_N):
        k = i + slot  # [R] position within the bag
        v, first_bad = _gather(weight_ptr, scale_bias_ptr, indices_ptr, psw_ptr, start + k, k < length, d, dmask,
                               base, stride, row_base, rows, first_bad, N, QUANT, HAS_W, ALIGN, EVICT, CHECK)
        acc += v  # [R, BLOCK_D]
    pooled = tl.sum(tl.reshape(acc, [BAGS, BLOCK_N, BLOCK_D]), axis=1)  # [BAGS, BLOCK_D]
    # per-bag values again, at [BAGS] (the tile rows with slot 0)
    gb = pid * BAGS + tl.arange(0, BAGS)  # [BAGS]
    gbmask = gb < n_bags
    gb = tl.where(gbmask, gb, 0)
    tb = gb // B
    bb = gb - tb * B
    _, _, dim_b, out_col, _, table_b, _ = _table_meta(meta_ptr, tb)
    if MEAN:
        start_b, end_b, _ = _bag_bounds(offsets_ptr, gb, table_b, bb, B, first_bag, N, TB, CONTIG)
        pooled = pooled / tl.maximum(end_b - start_b, 1).to(tl.float32)[:, None]
    out = out_ptr + bb.to(tl.int64)[:, None] * out_stride + out_col[:, None] + d[None, :]
    tl.store(out, pooled, mask=(d[None, :] < dim_b[:, None]) & gbmask[:, None])
    if CHECK:  # -1: malformed offsets; < N: first bad id position; N: all good
        any_bad_off = tl.max((ok_off == 0).to(tl.int32), axis=0)
        tl.store(err_ptr + pid * tl.num_programs(1) + pid_d, tl.where(any_bad_off > 0, -1, first_bad))


@triton.jit(do_not_specialize=["B", "first_bag", "N", "TB"])
def _eb_split_bag_kernel(
    weight_ptr, scale_bias_ptr, meta_ptr, indices_ptr, offsets_ptr, psw_ptr, out_ptr, err_ptr,
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
    base, stride, dim, out_col, row_base, table, rows = _table_meta(meta_ptr, t)
    start, end, ok_off = _bag_bounds(offsets_ptr, g, table, b, B, first_bag, N, TB, CONTIG)
    length = end - start
    if CHECK:  # a bag with bad offsets reads nothing
        end = tl.where(ok_off, end, start)
    first_bad = tl.zeros([], dtype=tl.int64) + N
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = d < dim
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(start + s * BLOCK_N, end, SPLITS * BLOCK_N):
        n = i + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        v, first_bad = _gather(weight_ptr, scale_bias_ptr, indices_ptr, psw_ptr, n, n < end, d, dmask[None, :],
                               base, stride, row_base, rows, first_bad, N, QUANT, HAS_W, ALIGN, EVICT, CHECK)
        acc += v  # [BLOCK_N, BLOCK_D]
    part = tl.sum(acc, axis=0)  # [BLOCK_D]
    if MEAN:
        part = part / tl.maximum(length, 1).to(tl.float32)
    # splits with no ids add nothing; skip their atomics (every bag's split 0 always writes)
    sv = d * 0 + s  # [BLOCK_D] (vector masks: the interpreter wants no 0-d ones)
    has_work = (sv * BLOCK_N < length) | (sv == 0)
    tl.atomic_add(out_ptr + b.to(tl.int64) * out_stride + out_col + d, part, mask=dmask & has_work, sem="relaxed")
    if CHECK:
        tl.store(err_ptr + pid * tl.num_programs(1) + pid_d, tl.where(ok_off, first_bad, -1))


@triton.jit(do_not_specialize=["N", "TB", "B", "T"])
def _validate_kernel(indices_ptr, offsets_ptr, rows_ptr, flags_ptr, N, TB, B, T, BLOCK: tl.constexpr,
                     T_POW2: tl.constexpr):
    """One pass over ids and offsets; program p writes flags[p] = [first position of an
    out-of-range id in its block (or N), 1 if its offsets are malformed else 0]."""
    pid = tl.program_id(0)
    p = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] positions
    qm = p < TB  # offsets pairs (p, p + 1)
    o0 = tl.load(offsets_ptr + p, mask=qm, other=0).to(tl.int64)
    o1 = tl.load(offsets_ptr + p + 1, mask=qm, other=0).to(tl.int64)
    bad_off = qm & ((o1 < o0) | ((p == 0) & (o0 != 0)) | ((p == TB - 1) & (o1 != N)))
    pm = p < N
    idx = tl.load(indices_ptr + p, mask=pm, other=0).to(tl.int64)
    ts = tl.arange(0, T_POW2)  # [T_POW2]
    seg = tl.load(offsets_ptr + ts * B, mask=(ts > 0) & (ts < T), other=N + 1).to(tl.int64)  # table starts
    table = tl.sum((p[:, None] >= seg[None, :]).to(tl.int32), axis=1)  # [BLOCK] ids are table-major
    rows = tl.load(rows_ptr + table, mask=pm, other=0)
    bad = pm & ((idx < 0) | (idx >= rows))
    first = tl.min(tl.where(bad, p.to(tl.int64), N), axis=0)
    tl.store(flags_ptr + pid * 2, first)
    tl.store(flags_ptr + pid * 2 + 1, tl.max(bad_off.to(tl.int64), axis=0))


# ----------------------------------------------------------------------------- launch


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
                  ALIGN=group.align, CONTIG=contig, BLOCK_D=block_d,
                  EVICT="evict_first" if cfg.get("EVICT", 0) else "",
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
    if sum(m.dim for m in group.meta_host) == out.shape[1]:
        out.zero_()
    else:
        for m in group.meta_host:
            out[:, m.out_col:m.out_col + m.dim].zero_()


def validate_ids(indices: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor, B: int) -> tuple[int, bool]:
    """One Triton pass over ids and offsets (one host sync): (first position of an
    out-of-range id, or N; whether the offsets are malformed). ``rows`` int64 [T]."""
    T = rows.numel()
    N, TB = indices.numel(), offsets.numel() - 1
    t_pow2 = triton.next_power_of_2(T)
    block = max(64, min(1024, 16384 // t_pow2))
    grid = triton.cdiv(max(N, TB), block)
    flags = torch.empty(grid, 2, dtype=torch.int64, device=indices.device)  # per block: [first bad, offsets bad]
    _validate_kernel[(grid,)](indices, offsets, rows, flags, N, TB, B, T, BLOCK=block, T_POW2=t_pow2)
    first_bad, offsets_bad = torch.stack([flags[:, 0].min(), flags[:, 1].max()]).tolist()  # the one sync
    return int(first_bad), bool(offsets_bad)
