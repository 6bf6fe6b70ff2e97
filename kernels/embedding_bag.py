"""Table-batched pooled embedding lookup (TBE): all tables of a shard in one launch.

Input layout (as FBGEMM's TBE)::

    T tables, batch B.  indices: flat, table-major; offsets: [T*B + 1]
    bag (t, b) = indices[offsets[t*B + b] : offsets[t*B + b + 1]]

    e.g. T=2, B=2, table 0 bags [3, 1] and [], table 1 bags [7] and [2, 2]:
    indices = [3, 1, 7, 2, 2]        offsets = [0, 2, 2, 3, 5]
    output  = [B, dim_0 + dim_1] float32, row b = [pool(bag(0, b)) | pool(bag(1, b))]

Accumulation is fp32; empty bags give zeros; mean divides by the bag length. The storage
types and their packing are in kernels/storage.py, the Triton kernels and their launcher in
kernels/embedding_bag_kernels.py; this file holds the torch reference and the public module
that picks between them.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
import triton

from kernels.embedding_bag_kernels import DEFAULT_CONFIGS, TEMPLATES, launch, validate_ids
from kernels.errors import BackendUnavailableError, IndexOutOfRangeError, KernelInputError
from kernels.registry import REFERENCE, Choice, Winners, pow2_bucket
from kernels.quantize import DTYPES
from kernels.storage import PackedGroup, TableWeights, dequantize_rows, pack_tables

OP = "embedding_bag"

__all__ = [  # the storage and launch names stay importable from here
    "DEFAULT_CONFIGS", "DTYPES", "OP", "TEMPLATES", "PackedGroup", "TableBatchedEmbeddingBag", "TableWeights",
    "dequantize_rows", "embedding_bag_reference", "launch", "pack_tables", "shape_bucket",
    "triton_usable",
]


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


def shape_bucket(max_dim: int, batch: int, avg_pooling: float) -> str:
    """Bucket of a lookup: 'd128_p8_b512' (max dim, ids per bag, batch; powers of two)."""
    return f"d{triton.next_power_of_2(max_dim)}_p{pow2_bucket(avg_pooling)}_b{pow2_bucket(batch)}"


def _malformed_offsets(N: int) -> KernelInputError:
    return KernelInputError(f"offsets: must start at 0, never decrease and end at len(indices)={N}")


def triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- public module


class TableBatchedEmbeddingBag:
    """All tables of one shard replica, looked up by one launch per storage dtype.

    Built once per replica: packs and uploads the weights, reads the device's winners,
    warms the kernels up. ``backend``:
      - ``"auto"``: on CUDA the searched winner for the call's shape bucket (or a
        neighbouring one, see kernels/registry.py), else the reference: where the device
        (or its compute capability) has no winners, or the search found nothing faster,
        no Triton config runs; on CPU the reference.
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
            views = {i: g.table_view(k) for g in self.groups for k, i in enumerate(g.table_ids)}
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
            first_bad, offsets_bad = validate_ids(indices, offsets, self.rows, B)
            if offsets_bad:
                raise _malformed_offsets(N)
            if first_bad < N:
                self._raise_bad_id(indices, offsets, B, first_bad)
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
            raise _malformed_offsets(N)
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
            raise _malformed_offsets(N)
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
        """Compile the configs this replica can pick (its dtypes' winners), on a tiny input,
        before serving."""
        T = self.num_tables
        B = 2
        out = torch.empty(B, self.total_dim, dtype=torch.float32, device=self.device)
        for g in self.groups:
            configs = {(e["template"], tuple(sorted(e["config"].items())))
                       for k, e in self.winners.entries.items()
                       if k.startswith(f"{OP}/{g.dtype}/") and e.get("backend") == "triton"}
            if self.backend == "triton":
                configs.add(("per_bag", tuple(sorted(DEFAULT_CONFIGS["per_bag"].items()))))
            for index_dtype in (torch.int64, torch.int32):
                indices = torch.zeros(T * B, dtype=index_dtype, device=self.device)
                offsets = torch.arange(T * B + 1, dtype=index_dtype, device=self.device)
                for template, cfg in sorted(configs):
                    launch(g, indices, offsets, None, out, B, pooling=self.pooling,
                           template=template, config=dict(cfg))
        torch.cuda.synchronize(self.device)
