"""``recserve bench --engine``: what the GPU code does without the serving layer.

Every shard core and the tower core of one package in this process, no RPC, large batches
of the workload's traffic. Per batch size, three figures from the same inputs:

- ``engine``: the cores' device steps only, inputs already staged on the device: each
  shard's captured graph (offsets, rebase, id check, lookup, cast), the pooled embeddings
  assembled into [B, F, D] on the device, the tower's graph. Timed with CUDA events over
  repeated replays.
- ``engine+io``: the cores as the monolith calls them, from numpy ShardRequests to numpy
  scores: staging into pinned buffers, H2D, the graphs, D2H (no decode, no split, no RPC).
- ``plain torch``: the formulation of the issue's in-process figure, in one CUDA graph:
  one ``F.embedding_bag`` over the packed tables (the shard's own weights, no copy) and
  the tower on torch ops only (backend "reference"). Only for a one-shard package whose
  tables share one float dtype.

Besides: the lookup alone (its HBM read rate: rows x D x element bytes / time), GPU
utilisation sampled during the engine runs, the largest |score| difference of the tower's
dtype against a float32 tower on the same inputs, and the MLPerf Inference figure for
scale. Imports no torchrec (neither does anything it imports).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loadtest.report import MLPERF_H200_EXAMPLES_PER_S


class EngineError(ValueError):
    """An engine-bench option is invalid; the message names it."""


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    package: Path  # a model package (e.g. from `recserve export --init random`)
    device: str = "cuda"
    batch_sizes: tuple[int, ...] = (1024, 4096, 16384, 65536)
    output_dtype: str = "float16"  # the shards' output (wire) dtype
    tower_dtype: str = "float16"
    seconds: float = 2.0  # timed per figure and batch size (after warm-up)
    seed: int = 0
    out_dir: Path = Path("benchmarks/results/engine")

    def __post_init__(self) -> None:
        if not (Path(self.package) / "manifest.json").exists():
            raise EngineError(f"--package: {self.package} is not a model package (no manifest.json)")
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise EngineError(f"--batch-sizes: need positive sizes, got {self.batch_sizes}")
        if not 0 < self.seconds <= 60:
            raise EngineError(f"--engine-seconds: must be in (0, 60], got {self.seconds}")


@dataclass
class EngineRow:
    batch: int
    ids: int  # ids looked up per batch
    engine_eps: float  # examples/s, device steps only
    engine_io_eps: float  # examples/s, numpy in -> numpy out
    plain_eps: float | None  # examples/s, plain torch in one graph
    lookup_ms: float  # the shards' device steps alone, per batch
    lookup_tbps: float  # rows read / lookup time, TB/s
    tower_ms: float  # the tower's device step alone, per batch
    tower_tflops: float  # its matrix products' FLOPs / tower time, TFLOP/s
    gpu_util: float | None  # mean utilisation during the engine runs, %
    paths: dict = field(default_factory=dict)  # shard -> lookup path of this bucket


class _Utilisation:
    """torch.cuda.utilization() (NVML) sampled every 50 ms in a thread; None without NVML."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self._stop = device, [], threading.Event()
        try:
            torch.cuda.utilization(device)
            self.ok = True
        except Exception:  # no NVML on this host
            self.ok = False

    def __enter__(self):
        if self.ok:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.samples.append(torch.cuda.utilization(self.device))

    def __exit__(self, *exc):
        self._stop.set()
        if self.ok:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def _timed(step, seconds: float, device: torch.device) -> float:
    """Seconds per call of ``step``: warm-up, then as many calls as fit in ``seconds``."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda *a: None)
    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(3, min(1000, int(seconds / once)))
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / n
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def run_engine(opts: EngineOptions) -> list[EngineRow]:
    from recserve.package import ModelPackage
    from recserve.synth import TrafficGenerator
    from serving.engine.pooled import embedding_dtype, to_torch
    from serving.engine.routing import Routing
    from serving.engine.shard import ShardCore
    from serving.engine.tower import TowerCore

    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda: no CUDA device here")
    pkg = ModelPackage.open(opts.package)
    m = pkg.manifest
    routing = Routing(m)
    sizes = tuple(sorted(opts.batch_sizes))
    graphs = device.type == "cuda"
    t0 = time.perf_counter()
    shards = {k: ShardCore(pkg, k, device=opts.device, output_dtype=opts.output_dtype, max_batch_size=sizes[-1],
                           batch_buckets=sizes, pad=True, graphs=graphs) for k in routing.columns}
    print(f"shards ready in {time.perf_counter() - t0:.1f} s "
          f"({sum(len(s.buckets) for s in shards.values())} buckets)", flush=True)
    tower = TowerCore.from_package(pkg, device=opts.device, dtype=opts.tower_dtype, max_batch_size=sizes[-1],
                                   batch_buckets=sizes, pad=True, graphs=graphs, input_dtype=opts.output_dtype)
    plain = _PlainTorch.of(pkg, shards, device, opts.tower_dtype)
    ref_tower = TowerCore.from_package(pkg, device=opts.device, graphs=False, pad=False)  # float32
    print(f"cores ready in {time.perf_counter() - t0:.1f} s; plain torch: {plain.why or 'yes'}", flush=True)
    features, D = len(routing.features), routing.dim
    index_host = {k: torch.tensor([c.feature_index for c in cols]) for k, cols in routing.columns.items()}
    index = {k: t.to(device) for k, t in index_host.items()}
    wire = embedding_dtype(opts.output_dtype)
    gen = TrafficGenerator(m.workload, seed=opts.seed)
    rows, lowp_diff, lookup_diff = [], None, None
    for B in sizes:
        batch = gen.batch(B)
        requests = routing.split(batch)
        N = sum(r.num_ids for r in requests.values())

        def assemble_host():  # [B, F, D] on the host in the wire dtype, as the tower receives it
            sparse = torch.zeros(B, features, D, dtype=wire)
            for k, r in requests.items():
                sparse.index_add_(1, index_host[k], to_torch(shards[k].lookup(r)).view(B, -1, D))
            return sparse

        def host_io():
            return tower.score(batch.dense, assemble_host())

        scores = host_io()
        if lookup_diff is None:  # the cores' lookup (graph or eager) against the kernels' reference
            lookup_diff = max(_lookup_error(shards[k], r) for k, r in requests.items())
        if lowp_diff is None:  # the tower's dtype against float32 on the same pooled inputs
            sparse = assemble_host()
            lowp_diff = float(np.abs(tower.score(batch.dense, sparse) - ref_tower.score(batch.dense, sparse)).max())
        staged = {k: shards[k].stage(r) for k, r in requests.items()}
        sparse_d = torch.zeros(B, features, D, dtype=wire, device=device)

        def lookups():
            return {k: shards[k].run_staged(b)[0] for k, b in staged.items()}

        def engine():
            sparse_d.zero_()
            for k, pooled in lookups().items():
                sparse_d.index_add_(1, index[k], pooled[:B].view(B, -1, D))
            tower.run_staged(tower.stage(batch.dense, sparse_d))

        engine()
        with _Utilisation(device) as util:
            t_engine = _timed(engine, opts.seconds, device)
        t_lookup = _timed(lookups, opts.seconds / 2, device)
        tower_bucket = tower.stage(batch.dense, sparse_d)
        t_tower = _timed(lambda: tower.run_staged(tower_bucket), opts.seconds / 2, device)
        t_io = _timed(host_io, opts.seconds, device)
        t_plain = plain.time(batch, requests, opts.seconds) if plain.why is None else None
        elem = pkg.manifest.dtype
        row_bytes = D * {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1 + 8 / D, "int4": 0.5 + 8 / D}[elem]
        row = EngineRow(batch=B, ids=N, engine_eps=B / t_engine, engine_io_eps=B / t_io,
                        plain_eps=B / t_plain if t_plain else None, lookup_ms=t_lookup * 1e3,
                        lookup_tbps=N * row_bytes / t_lookup / 1e12, tower_ms=t_tower * 1e3,
                        tower_tflops=B * _tower_flops(tower) / t_tower / 1e12, gpu_util=util.mean,
                        paths={k: shards[k]._path_for(b) for k, b in staged.items() if b is not None})
        rows.append(row)
        print(f"  B={B:>6} ids={N:>9,}: engine {row.engine_eps / 1e6:6.2f}M ex/s  engine+io "
              f"{row.engine_io_eps / 1e6:6.2f}M  plain torch "
              f"{(row.plain_eps or 0) / 1e6:6.2f}M  lookup {row.lookup_ms:.2f} ms ({row.lookup_tbps:.2f} TB/s)  "
              f"tower {row.tower_ms:.2f} ms ({row.tower_tflops:.0f} TFLOP/s)  "
              f"util {row.gpu_util if row.gpu_util is not None else '-'}  scores finite {np.isfinite(scores).all()}",
              flush=True)
    _write(opts, rows, pkg, lowp_diff, lookup_diff, device)
    return rows


def _tower_flops(tower) -> float:
    """FLOPs per example of the tower's matrix products (2 x weight elements; the dot
    interaction's Gram matrix; elementwise work left out)."""
    flops = sum(2 * p.numel() for p in tower.parameters() if p.dim() == 2)
    if tower.interaction == "dot":
        F_, D, _ = tower.shape
        flops += 2 * (F_ + 1) ** 2 * D
    return float(flops)


def _lookup_error(shard, request) -> float:
    """max |pooled - reference| / max |reference| of one request: the shard's request path
    (bucketed, graphs on a GPU, output dtype) against one F.embedding_bag per table in fp32."""
    from kernels import embedding_bag_reference
    from serving.engine.pooled import to_torch

    got = to_torch(shard.lookup(request)).float()
    col = np.repeat(np.arange(len(shard.columns)), request.lengths.sum(axis=1))
    device = shard.device
    local = torch.from_numpy(request.values - shard._row_start[col]).to(device)
    offsets = torch.zeros(request.lengths.size + 1, dtype=torch.int64, device=device)
    torch.cumsum(torch.from_numpy(request.lengths.reshape(-1)).to(device), 0, out=offsets[1:])
    want = embedding_bag_reference(shard.lookup_kernel.tables, local, offsets).cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


class _PlainTorch:
    """One F.embedding_bag over the packed tables + the tower on torch ops, in one CUDA graph."""

    def __init__(self, why: str | None, **parts):
        self.why = why
        self.__dict__.update(parts)

    @staticmethod
    def of(pkg, shards, device: torch.device, tower_dtype: str) -> _PlainTorch:
        from serving.engine.tower import TowerCore

        if len(shards) != 1:
            return _PlainTorch("n/a: needs a one-shard package")
        shard = next(iter(shards.values()))
        if shard._fused is None:
            return _PlainTorch("n/a: needs one float storage dtype for all tables")
        tower = TowerCore.from_package(pkg, device=str(device), dtype=tower_dtype, backend="reference",
                                       graphs=False, pad=False)
        return _PlainTorch(None, shard=shard, tower=tower, device=device)

    def time(self, batch, requests, seconds: float) -> float:
        shard, tower, device = self.shard, self.tower, self.device
        (k, r), = requests.items()
        table, row_base = shard._fused
        B, C = r.batch_size, r.lengths.shape[0]
        col = np.repeat(np.arange(C), r.lengths.sum(axis=1))
        ids = torch.from_numpy(r.values - shard._row_start[col]).to(device) + row_base[torch.from_numpy(col).to(device)]
        offsets = torch.zeros(C * B + 1, dtype=torch.int64, device=device)
        torch.cumsum(torch.from_numpy(r.lengths.reshape(-1)).to(device), 0, out=offsets[1:])
        dense = torch.from_numpy(batch.dense).to(device)
        D = table.shape[1]

        def step():
            bags = F.embedding_bag(ids, table, offsets, mode="sum", include_last_offset=True)  # [C*B, D]
            return torch.sigmoid(tower.forward(dense, bags.view(C, B, D).transpose(0, 1)))  # [B]

        if device.type != "cuda":
            return _timed(step, seconds, device)
        from serving.engine.graphs import GraphSet

        graphs = GraphSet(device)
        graphs.capture("plain", step)
        return _timed(lambda: graphs.replay("plain"), seconds, device)


def _write(opts: EngineOptions, rows: list[EngineRow], pkg, lowp_diff: float | None, lookup_diff: float | None,
           device: torch.device) -> None:
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = pkg.manifest
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = (f"engine-only: {m.workload.name}, {sum(t.rows for t in m.workload.tables):,} rows, tables {m.dtype}, "
            f"{m.plan.num_shards} shard(s), output {opts.output_dtype}, tower {opts.tower_dtype}, {name}")
    lines = [head, "",
             "| batch | ids | engine (device) ex/s | engine + host I/O ex/s | plain torch ex/s | engine / plain "
             "| lookup ms | lookup TB/s | tower ms | tower TFLOP/s | GPU util % |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r.engine_eps / r.plain_eps:.2f}x" if r.plain_eps else "-"
        util = f"{r.gpu_util:.0f}" if r.gpu_util is not None else "-"
        plain = f"{r.plain_eps / 1e6:.2f}M" if r.plain_eps else "n/a"
        lines.append(f"| {r.batch:,} | {r.ids:,} | {r.engine_eps / 1e6:.2f}M | {r.engine_io_eps / 1e6:.2f}M | {plain} "
                     f"| {ratio} | {r.lookup_ms:.2f} | {r.lookup_tbps:.2f} | {r.tower_ms:.2f} | {r.tower_tflops:.1f} "
                     f"| {util} |")
    lines += ["", f"MLPerf Inference v5.0, H200, DLRMv2 server (TensorRT, int8, P99 <= 60 ms): "
                  f"~{MLPERF_H200_EXAMPLES_PER_S / 1e6:.1f}M examples/s per GPU.",
              f"Tower {opts.tower_dtype} vs float32 on the same pooled inputs (B={rows[0].batch}): "
              f"max |score difference| = {lowp_diff:.2e}." if lowp_diff is not None else "",
              f"Lookup (request path, {opts.output_dtype} out) vs one F.embedding_bag per table in fp32 "
              f"(B={rows[0].batch}): max |difference| / max |value| = {lookup_diff:.2e}."
              if lookup_diff is not None else ""]
    text = "\n".join(lines) + "\n"
    (out / "engine.md").write_text(text)
    (out / "engine.json").write_text(json.dumps({
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "device": name, "torch": torch.__version__, "source": os.environ.get("RECSERVE_BENCH_SOURCE", ""),
        "tower_lowp_max_abs_diff": lowp_diff, "lookup_rel_err": lookup_diff, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    print(text + f"wrote {out / 'engine.md'}, {out / 'engine.json'}", flush=True)
