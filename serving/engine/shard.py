"""One embedding shard: its tables' row slices from its own shard file, one table-batched
lookup over all of them. Ray-free; the Serve deployment in deployments.py and the monolith
(serving/engine/local_ranker.py) wrap it.

The request path on a GPU (``device="cuda"``), one lock held throughout::

    host    ShardRequest (numpy) -> pinned staging buffers of the request's bucket
            (ids [N_b], lengths [C, B_b]: bags past B are empty, ids past N are stale)
    device  H2D -> CUDA graph of the bucket: offsets = cumsum(lengths), column of each id,
            rebase to slice rows, id check (a device flag; bad ids masked to row 0),
            lookup, cast to the output dtype                 -> pooled [B_b, C * D]
    host    D2H of pooled[:B] and the flag into pinned buffers, one stream sync -> numpy

Buckets (serving/engine/buckets.py) and their graphs are captured at start; a request above every
bucket runs the same steps eagerly at its own shape. On a CPU the steps run eagerly and
unpadded (``pad=True`` pads there too: the tests compare padded with unpadded lookups).

The lookup itself is, per bucket: the kernels' Triton TBE where the device's winners pick
Triton for that shape, else (GPU, one float storage dtype) one ``F.embedding_bag`` over the
packed tables ("fused": the plain-torch formulation, one launch instead of one per table,
and capturable, unlike the per-table reference which reads table bounds on the host), else
the kernels' reference, eagerly.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from kernels import IndexOutOfRangeError, KernelInputError, TableBatchedEmbeddingBag, TableWeights
from recserve.package import ModelPackage
from serving.api.errors import DeadlineExceeded
from serving.engine.buckets import Bucket, pick, shard_buckets
from serving.config import DEFAULT_MAX_BATCH_SIZE
from serving.engine.graphs import GraphSet
from serving.engine.pooled import embedding_dtype, to_numpy
from serving.engine.routing import Column, Routing, ShardRequest, concat_requests

LOOKUP_PATHS = ("auto", "kernel", "fused")


class ShardCore:
    """Shard ``index`` of a package, ready to look up.

    Loads and verifies only ``shards/shard-{index}.safetensors``. Lookup columns follow
    :class:`Routing` (one per served feature per slice; a table read by two features is
    packed twice). Ids arrive global and are rebased here: id ``i`` of a slice starting at
    ``row_start`` is row ``i - row_start``.

    ``output_dtype``: float32 (default), float16 or bfloat16; pooled embeddings are cast on
    the device, so 16-bit halves the D2H bytes. numpy has no bfloat16: bfloat16 outputs are
    uint16 arrays of its bits (serving/engine/pooled.py turns them back).

    ``max_batch_size`` / ``batch_buckets``: the batch sizes captured at start (default the
    powers of two up to ``max_batch_size``). ``graphs`` (default: on for CUDA) and ``pad``
    (default: as ``graphs``). ``lookup_path``: "auto" (see the module docstring), "kernel"
    or "fused" (tests and benchmarks).

    Thread safety: one lookup at a time (a lock: the staging buffers and graphs are shared);
    the Serve deployment calls :meth:`lookup_many` from one thread of its own.

    The id check: the router and the monolith already validate every id against its table
    at decode (serving/api/codec.py), so the shard must not pay a host sync per request for a
    second check, yet a direct caller with a bad id must still get the typed
    :class:`IndexOutOfRangeError`, and no bad id may ever be dereferenced on the device.
    So the device step computes a flag (any live id outside its slice) and masks bad ids to
    row 0 inside the graph; the flag comes back with the output's own D2H copy, which needs
    the one stream sync a lookup has anyway. Only when it is set does the host look for the
    first bad id (in the request's numpy arrays) and raise. No extra sync, no extra pass.
    """

    def __init__(self, package: ModelPackage, index: int, *, device: str = "cpu", backend: str = "auto",
                 output_dtype: torch.dtype | str = torch.float32, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_buckets: tuple[int, ...] | None = None, graphs: bool | None = None,
                 pad: bool | None = None, lookup_path: str = "auto"):
        if lookup_path not in LOOKUP_PATHS:
            raise ValueError(f"lookup_path: must be one of {LOOKUP_PATHS}, got {lookup_path!r}")
        self.index = index
        self.columns: tuple[Column, ...] = Routing(package.manifest).columns[index]
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.output_dtype = embedding_dtype(output_dtype)
        self.output_dim = sum(c.dim for c in self.columns)  # columns x D
        self._row_start = np.array([c.row_start for c in self.columns], np.int64)  # [C]
        self._rows = np.array([c.row_end - c.row_start for c in self.columns], np.int64)  # [C]
        self._lock = threading.Lock()
        self._h2d_done: torch.cuda.Event | None = None  # the last staging copies (pinned buffers reusable after)
        self.graphs: GraphSet | None = None
        self.buckets: tuple[Bucket, ...] = ()
        self.lookup_kernel = None
        if not self.columns:
            return
        slices = {(s.table, s.row_start): s for s in package.load_shard(index)}
        tables = []
        for c in self.columns:
            s = slices[(c.table, c.row_start)]
            tables.append(TableWeights(weight=s.weight, dim=s.dim, dtype=s.dtype, scale=s.scale, bias=s.bias))
        self.lookup_kernel = TableBatchedEmbeddingBag(tables, pooling="sum", device=self.device, backend=backend)
        self._lookup_path = lookup_path
        self._fused = self._fused_table()
        if lookup_path == "fused" and self._fused is None:
            raise ValueError("lookup_path='fused' needs every column in one float storage dtype (packed)")
        on = lambda x: torch.as_tensor(x).to(self.device)  # noqa: E731
        self._row_start_d, self._rows_d = on(self._row_start), on(self._rows)  # [C] each
        use_graphs = self.device.type == "cuda" if graphs is None else graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError("graphs=True needs a CUDA device")
        self.pad = use_graphs if pad is None else pad
        if self.pad:
            tables_by_name = {t.name: t for t in package.manifest.workload.tables}
            ids_per_example = sum(tables_by_name[c.table].pooling_factor * (c.row_end - c.row_start)
                                  / tables_by_name[c.table].rows for c in self.columns)
            self.buckets = shard_buckets(max_batch_size, ids_per_example, sizes=batch_buckets, spread=2)
            self._make_staging(max(b.batch for b in self.buckets), max(b.ids for b in self.buckets))
            if use_graphs:
                self.graphs = GraphSet(self.device)
        self.warmup()

    # ------------------------------------------------------------------ set-up

    def _fused_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The packed weights as one [sum rows, D] table and each column's first row in it,
        when every column is in one float group (no copy: a view of the packed buffer)."""
        groups = self.lookup_kernel.groups
        if len(groups) != 1 or groups[0].quant != 0:
            return None
        g = groups[0]
        meta = g.meta_host  # TableMeta per packed table
        D = meta[0].dim
        if (any(m.stride != D or m.dim != D or m.base % D for m in meta)
                or list(g.table_ids) != list(range(len(self.columns)))):
            return None
        row_base = torch.tensor([m.base // D for m in meta], dtype=torch.int64, device=self.device)  # [C]
        return g.weight.view(-1, D), row_base

    def _make_staging(self, max_batch: int, max_ids: int) -> None:
        """Pinned host buffers and their device twins, sized for the largest bucket."""
        C, pin = len(self.columns), self.device.type == "cuda"
        host = lambda n, dt: torch.empty(n, dtype=dt, pin_memory=pin)  # noqa: E731
        self._ids_h = host(max_ids, torch.int64)  # [N_max] global ids
        self._lengths_h = host(C * max_batch, torch.int32)  # [C * B_max]
        self._weights_h = host(max_ids, torch.float32)  # [N_max]
        if pin:
            dev = lambda t: torch.zeros_like(t, device=self.device)  # noqa: E731
            self._ids_d, self._lengths_d, self._weights_d = dev(self._ids_h), dev(self._lengths_h), dev(self._weights_h)
            self._out_h = host(max_batch * self.output_dim, self.output_dtype)  # [B_max * C * D]
            self._flag_h = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self._h2d_done = torch.cuda.Event()
        else:  # CPU: the staging buffers are the inputs
            self._ids_d, self._lengths_d, self._weights_d = self._ids_h, self._lengths_h, self._weights_h
        self._ids_h.zero_()
        self._lengths_h.zero_()
        self._weights_h.fill_(1.0)

    def warmup(self) -> None:
        """Kernels chosen, compiled and (on CUDA) every bucket's graph captured, now; weighted
        lookups (eager) warmed at every bucket too. Without buckets: lookups at B = 1 and 8."""
        if self.lookup_kernel is None:
            return
        if not self.buckets:
            for B in (1, 8):
                C = len(self.columns)
                self.lookup(ShardRequest(lengths=np.ones((C, B), np.int32), values=np.repeat(self._row_start, B)))
            return
        for b in self.buckets:  # staging holds zeros: every bag empty (values do not matter to a capture)
            ids, lengths, weights = self._staged(b, weighted=True)
            self._compute(ids, lengths, weights, b.batch, self._path_for(b))
            if self.graphs is not None and self._capturable(b):
                self.graphs.capture(b, self._step(b))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _path_for(self, bucket: Bucket) -> str:
        if self._lookup_path != "auto":
            return self._lookup_path
        k = self.lookup_kernel
        if self.device.type == "cuda" and k.backend == "auto":
            if k.groups and all(k.choice(g, bucket.batch, bucket.ids).backend == "triton" for g in k.groups):
                return "kernel"
            if self._fused is not None:
                return "fused"
        return "kernel"

    def _capturable(self, bucket: Bucket) -> bool:
        """The per-table reference reads table bounds on the host: it cannot be captured."""
        if self._path_for(bucket) == "fused":
            return True
        k = self.lookup_kernel
        return k.backend != "reference" and bool(k.groups) and all(
            k.choice(g, bucket.batch, bucket.ids).backend == "triton" for g in k.groups)

    # ------------------------------------------------------------------ device step

    def _compute(self, ids: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None, B: int,
                 path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ids int64 [N] global (past the last offset: ignored), lengths int32 [C * B], weights
        float32 [N] or None -> (pooled [B, C * D] in the output dtype, bool flag: any bad id)."""
        C = len(self.columns)
        N = ids.numel()
        offsets = torch.zeros(C * B + 1, dtype=torch.int64, device=ids.device)  # [C*B + 1]
        torch.cumsum(lengths, 0, out=offsets[1:])
        starts = offsets[::B].contiguous()  # [C + 1] first id of each column
        pos = torch.arange(N, dtype=torch.int64, device=ids.device)  # [N]
        col = torch.bucketize(pos, starts[1:], right=True)  # [N] column of each id; C past the last offset
        live = col < C
        col = col.clamp_(max=C - 1)
        local = ids - self._row_start_d[col]  # [N] row within the slice
        bad = live & ((local < 0) | (local >= self._rows_d[col]))
        flag = bad.any()
        local = torch.where(live & ~bad, local, 0)  # never dereference a bad or stale id
        if path == "fused":
            table, row_base = self._fused
            psw = None if weights is None else weights.to(table.dtype)
            # CUDA's embedding_bag ends the last bag at len(input), not at the last offset: one
            # extra bag [offsets[-1], N) takes the stale ids past the last offset; it is dropped
            ends = torch.cat((offsets, offsets.new_full((1,), N)))  # [C*B + 2]
            bags = F.embedding_bag(local + row_base[col], table, ends, mode="sum", per_sample_weights=psw,
                                   include_last_offset=True)[:C * B]  # [C*B, D] column-major bags
            D = table.shape[1]
            pooled = torch.empty(B, C, D, dtype=self.output_dtype, device=ids.device)  # [B, C, D]
            pooled.copy_(bags.view(C, B, D).transpose(0, 1))
            return pooled.view(B, C * D), flag
        pooled = self.lookup_kernel.forward_unchecked(local, offsets, weights, B)  # [B, C*D] fp32
        return pooled.to(self.output_dtype), flag

    def _staged(self, bucket: Bucket, *, weighted: bool):
        C = len(self.columns)
        return (self._ids_d[:bucket.ids], self._lengths_d[:C * bucket.batch],
                self._weights_d[:bucket.ids] if weighted else None)

    def _step(self, bucket: Bucket):
        path = self._path_for(bucket)
        return lambda: self._compute(*self._staged(bucket, weighted=False), bucket.batch, path)

    def stage(self, request: ShardRequest) -> Bucket | None:
        """Copies a request into the staging buffers of its bucket (H2D queued, not awaited);
        None when it is above every bucket. Call with the lock held (or single-threaded)."""
        B, N, C = request.batch_size, request.num_ids, len(self.columns)
        bucket = pick(self.buckets, B, N) if self.pad else None
        if bucket is None:
            return None
        if self._h2d_done is not None:
            self._h2d_done.synchronize()  # the previous request's copies out of the pinned buffers ran
        lengths = self._lengths_h[:C * bucket.batch].view(C, bucket.batch).numpy()  # [C, B_b]
        lengths[:, :B] = request.lengths
        lengths[:, B:] = 0  # padded bags are empty
        self._ids_h.numpy()[:N] = request.values
        if request.weights is not None:
            self._weights_h.numpy()[:N] = request.weights
        if self._ids_d is not self._ids_h:
            self._ids_d[:N].copy_(self._ids_h[:N], non_blocking=True)
            self._lengths_d[:C * bucket.batch].copy_(self._lengths_h[:C * bucket.batch], non_blocking=True)
            if request.weights is not None:
                self._weights_d[:N].copy_(self._weights_h[:N], non_blocking=True)
            self._h2d_done.record()
        return bucket

    def run_staged(self, bucket: Bucket, *, weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The device step of a staged bucket: its graph's replay, or the same steps eagerly.
        Returns (pooled [B_b, C * D], flag); valid until the next call."""
        if not weighted and self.graphs is not None and bucket in self.graphs:
            return self.graphs.replay(bucket)
        return self._compute(*self._staged(bucket, weighted=weighted), bucket.batch, self._path_for(bucket))

    # ------------------------------------------------------------------ request path

    def _check_lengths(self, request: ShardRequest) -> None:
        C, lengths = len(self.columns), request.lengths
        if lengths.shape[0] != C or int(lengths.sum()) != request.num_ids or (lengths < 0).any():
            raise KernelInputError(f"shard {self.index}: lengths must be [C={C}, B] non-negative and sum to "
                                   f"len(values)={request.num_ids}, got {tuple(lengths.shape)} summing to "
                                   f"{int(lengths.sum())}")

    def _run(self, request: ShardRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [>= B, C * D], flag) on the device; call with the lock held."""
        bucket = self.stage(request)
        if bucket is not None:
            return self.run_staged(bucket, weighted=request.weights is not None)
        on = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        lengths = on(request.lengths.reshape(-1).astype(np.int32, copy=False))
        weights = None if request.weights is None else on(request.weights)
        path = self._path_for(Bucket(request.batch_size, request.num_ids))
        return self._compute(on(request.values.astype(np.int64, copy=False)), lengths, weights,
                             request.batch_size, path)

    def lookup(self, request: ShardRequest) -> np.ndarray:
        """Pooled embeddings [B, C * D] in the output dtype (columns in shard order)."""
        B = request.batch_size
        self._check_lengths(request)
        if self.lookup_kernel is None or request.num_ids == 0:
            return to_numpy(torch.zeros(B, self.output_dim, dtype=self.output_dtype))
        with self._lock:
            pooled, flag = self._run(request)
            out, bad = self._fetch(pooled, flag, B)
        if bad:
            self._raise_bad_id(request)
        return out

    def lookup_device(self, request: ShardRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embeddings [B, C * D] in the output dtype, left on the device, and the
        bad-id flag (a device bool), without any sync: for a caller that keeps the pooled
        embeddings on the GPU (the monolith) and syncs once at its end, then calls
        :meth:`check_ids`."""
        B = request.batch_size
        self._check_lengths(request)
        if self.lookup_kernel is None or request.num_ids == 0:
            return (torch.zeros(B, self.output_dim, dtype=self.output_dtype, device=self.device),
                    torch.zeros((), dtype=torch.bool, device=self.device))
        with self._lock:
            pooled, flag = self._run(request)
            return pooled[:B].clone(), flag.clone()  # the graph's buffers are reused by the next call

    def check_ids(self, request: ShardRequest, flag: torch.Tensor) -> None:
        """Raise :class:`IndexOutOfRangeError` if :meth:`lookup_device` flagged a bad id."""
        if bool(flag):
            self._raise_bad_id(request)

    def _fetch(self, pooled: torch.Tensor, flag: torch.Tensor, B: int) -> tuple[np.ndarray, bool]:
        """pooled[:B] and the flag to the host (one stream sync on a GPU)."""
        if self.device.type != "cuda":
            return to_numpy(pooled[:B]).copy(), bool(flag)
        if not self.pad or B * self.output_dim > self._out_h.numel():  # no staging buffer, or above it (eager)
            out = pooled[:B].cpu()
            return to_numpy(out), bool(flag)
        host = self._out_h[:B * self.output_dim].view(B, self.output_dim)  # pinned
        host.copy_(pooled[:B], non_blocking=True)
        self._flag_h.copy_(flag, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return to_numpy(host).copy(), bool(self._flag_h)

    def _raise_bad_id(self, request: ShardRequest) -> None:
        """The first id outside its column's slice, as the kernels' typed error."""
        per_column = request.lengths.sum(axis=1)  # [C]
        col = np.repeat(np.arange(len(self.columns)), per_column)  # [N]
        local = request.values - self._row_start[col]
        p = int(np.argmax((local < 0) | (local >= self._rows[col])))
        raise IndexOutOfRangeError(table=int(col[p]), index=int(local[p]), rows=int(self._rows[col[p]]), position=p)

    def lookup_many(self, requests: list[ShardRequest], targets: list[torch.Tensor | None] | None = None,
                    *, clock=time.time) -> list[np.ndarray | None | DeadlineExceeded]:
        """Several requests in one lookup (dynamic batching); one output per request.

        ``targets[i]``: a device tensor [B_i, C * D] in the output dtype (a tower's ring,
        serving/engine/ipc.py) that request i's output is copied into, on this device, before
        this returns; its output is then None. The rest come back as numpy. The fence that
        lets a tower reuse a slot soon after a call it gave up on: a copy into a target is
        never queued once its request's deadline has passed (``clock``, wall time like the
        deadline); that request's output is then a :class:`DeadlineExceeded` (not raised:
        its batch mates keep theirs)."""
        bounds = np.cumsum([r.batch_size for r in requests])[:-1]
        if targets is None or all(t is None for t in targets):
            if len(requests) == 1:
                return [self.lookup(requests[0])]
            return np.split(self.lookup(concat_requests(requests)), bounds)  # [sum B, C * D] split
        request = requests[0] if len(requests) == 1 else concat_requests(requests)
        B = request.batch_size
        self._check_lengths(request)
        with self._lock:
            if self.lookup_kernel is None or request.num_ids == 0:
                pooled = torch.zeros(B, self.output_dim, dtype=self.output_dtype, device=self.device)  # [B, C * D]
                flag = torch.zeros((), dtype=torch.bool, device=self.device)
            else:
                pooled, flag = self._run(request)  # [>= B, C * D] on the device
            now, late = clock(), {}
            for i, (t, start, r) in enumerate(zip(targets, (0, *bounds), requests)):
                if t is None:
                    continue
                if r.deadline is not None and now > r.deadline:  # its caller gave up: the slot may be reused
                    late[i] = DeadlineExceeded("the request's deadline passed before its output was written")
                else:
                    t.copy_(pooled[start:start + r.batch_size], non_blocking=True)
            if any(t is None for t in targets):
                host, bad = self._fetch(pooled, flag, B)  # the one stream sync (the copies above ran first)
                outs = [None if t is not None else part for t, part in zip(targets, np.split(host, bounds))]
            else:
                bad = self._synced_flag(flag)
                outs = [None] * len(requests)
        if bad:
            self._raise_bad_id(request)
        return [late.get(i, out) for i, out in enumerate(outs)]

    def _synced_flag(self, flag: torch.Tensor) -> bool:
        """The bad-id flag on the host after one stream sync (every copy queued before it ran)."""
        if self.device.type == "cuda" and self.pad:
            self._flag_h.copy_(flag, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return bool(self._flag_h)
        return bool(flag)  # on a GPU: a sync
