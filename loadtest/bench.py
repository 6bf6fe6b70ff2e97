"""``recserve bench``: one trace, many serving configurations, fixed offered rates.

For each configuration (``monolith`` or ``STRATEGY-SHARDS``, e.g. ``table-2``) the bench
exports the package if it is not there yet, starts the server in its own process group,
warms it up, then replays the same seeded trace open-loop at each offered rate (and
closed-loop at a fixed concurrency for the maximum throughput), measuring the CPU busy
time of the serving processes over each run. Configurations whose plan is identical to
an earlier one's (every strategy at one shard, ``singular`` at any count) are run once and
named by the first.

Outputs in ``out_dir``: ``bench.csv`` (every row), ``p99.png`` (P99 vs offered load, one
line per configuration), ``table.md`` and ``table.txt``, and the servers' logs.
Traffic goes only to 127.0.0.1; every run is bounded by a duration and a request count.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.cpu import self_cpu_s
from loadtest.driver import closed_loop, open_loop, warm_up
from loadtest.gpu import GpuSampler
from loadtest.report import MLPERF_H200_EXAMPLES_PER_S, format_table, plot_p99, write_csv
from loadtest.stats import RunSummary, fill_cpu_overhead, summarize
from loadtest.trace import Trace, cap_rows_to_served, fanout, make_trace
from serving.engine.stages import breakdown, format_breakdown
from serving.engine.stages import scrape as stage_totals
from recserve.workloads import load_workload
from sharding.types import STRATEGIES, ShardPlan

MONOLITH = "monolith"


class BenchError(ValueError):
    """A bench option is invalid; the message names it."""


def parse_config(name: str) -> tuple[str, int] | None:
    """``"table-2"`` -> ("table", 2); ``"monolith"`` -> None. BenchError otherwise."""
    if name == MONOLITH:
        return None
    strategy, _, shards = name.rpartition("-")
    if strategy not in STRATEGIES or not shards.isdigit() or int(shards) <= 0:
        raise BenchError(
            f"--configs: {name!r} is not 'monolith' or STRATEGY-SHARDS with STRATEGY in {STRATEGIES} (e.g. table-2)"
        )
    return strategy, int(shards)


def default_configs(shard_counts: tuple[int, ...] = (1, 2, 4)) -> tuple[str, ...]:
    """monolith and every strategy at every count (singular-N > 1 is the same plan as singular-1)."""
    return (MONOLITH, *(f"{s}-{n}" for n in shard_counts for s in STRATEGIES))


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """Everything one bench run needs; validated on construction."""

    workload: str = "criteo-kaggle"  # bundled name or JSON file
    max_rows: int | None = 100_000  # cap every table (fits a small machine); None = full size
    configs: tuple[str, ...] = field(default_factory=default_configs)
    rates: tuple[float, ...] = (50.0, 100.0, 200.0)  # offered requests/s, open loop
    duration_s: float = 20.0  # per rate
    max_requests: int = 20_000  # per run
    closed_concurrency: int = 8  # closed-loop workers; 0 = no closed-loop run
    trace_size: int = 2_000  # distinct requests in the trace (replayed cyclically)
    seed: int = 0
    timeout_s: float = 5.0  # per-request deadline
    arrivals: str = "poisson"
    warmup_requests: int = 50
    dtype: str = "fp32"
    shard_memory: str | None = None  # for the capacity strategy, e.g. "8MiB"
    train_steps: int = 200
    artifacts: Path = Path("artifacts/bench")
    out_dir: Path = Path("benchmarks/results")
    serve_env: tuple[tuple[str, str], ...] = ()  # extra env for the Ray Serve stack
    serve_args: tuple[str, ...] = ()  # extra args for `recserve serve`
    device: str = "cpu"  # torch device of the servers (and of --init random's weight drawing)
    init: str = "trained"  # "trained" (recserve train, torchrec) or "random" (export --init random)
    discard_packages: bool = False  # delete each package after its configuration ran (full size, small disk)
    idle_s: float = 5.0  # seconds the serving processes' CPU is read with no requests, before the runs; 0: skip

    def __post_init__(self) -> None:
        for c in self.configs:
            parse_config(c)
        if not self.configs:
            raise BenchError("--configs: name at least one configuration")
        if not self.rates and not self.closed_concurrency:
            raise BenchError("--rates: give at least one rate, or a --closed-concurrency")
        if any(r <= 0 for r in self.rates):
            raise BenchError(f"--rates: must be positive, got {list(self.rates)}")
        if self.duration_s <= 0 or self.duration_s > 600:
            raise BenchError(f"--duration: must be in (0, 600] seconds, got {self.duration_s}")
        if self.max_requests <= 0:
            raise BenchError(f"--max-requests: must be positive, got {self.max_requests}")
        if self.trace_size <= 0:
            raise BenchError(f"--trace-size: must be positive, got {self.trace_size}")
        if not 0 <= self.idle_s <= 600:
            raise BenchError(f"--idle-seconds: must be in [0, 600], got {self.idle_s}")
        if self.closed_concurrency < 0:
            raise BenchError(f"--closed-concurrency: must be >= 0, got {self.closed_concurrency}")
        if self.init not in ("trained", "random"):
            raise BenchError(f"--init: must be trained or random, got {self.init!r}")
        if self.arrivals not in ("poisson", "uniform"):
            raise BenchError(f"--arrivals: must be poisson or uniform, got {self.arrivals!r}")

    @property
    def model_dir(self) -> Path:
        rows = f"rows{self.max_rows}" if self.max_rows else "full"
        name = Path(self.workload).stem
        init = "-random" if self.init == "random" else ""
        return self.artifacts / f"{name}-{rows}-{self.dtype}{init}"


def _recserve(*args: str) -> None:
    """Run a ``recserve`` subcommand in a child process (keeps torch out of the sender)."""
    cmd = [sys.executable, "-m", "recserve.cli", *args]
    print("$ recserve " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def ensure_state_dict(opts: BenchOptions) -> Path:
    path = opts.model_dir / "model.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = ["--max-rows", str(opts.max_rows)] if opts.max_rows else []
        _recserve("train", "--workload", opts.workload, *rows, "--out", str(path), "--steps", str(opts.train_steps))
    return path


def shard_memory_for(opts: BenchOptions, strategy: str, shards: int) -> str | None:
    """The per-shard cap for ``strategy``: --shard-memory, or for ``capacity`` without one,
    the tables' total bytes / shards + 10% (so the bin-packing has room but needs every shard)."""
    if opts.shard_memory or strategy != "capacity":
        return opts.shard_memory
    from recserve.planning import table_specs

    workload = load_workload(opts.workload).with_max_rows(opts.max_rows)
    total = sum(t.bytes for t in table_specs(workload, opts.dtype))  # bytes
    return str(int(total / shards * 1.1) + 1)


def plan_for(opts: BenchOptions, strategy: str, shards: int) -> ShardPlan:
    """The plan ``recserve export`` would write for this configuration (no export needed)."""
    from recserve.planning import parse_bytes, plan_workload

    if strategy == "singular":
        shards = 1  # every table on one shard, whatever the count asked for
    mem = shard_memory_for(opts, strategy, shards)
    workload = load_workload(opts.workload).with_max_rows(opts.max_rows)
    return plan_workload(
        workload, strategy=strategy, num_shards=shards, shard_memory=parse_bytes(mem) if mem else None, dtype=opts.dtype
    )


def ensure_package(opts: BenchOptions, strategy: str, shards: int) -> Path:
    out = opts.model_dir / "packages" / f"{strategy}-{shards}"
    if not (out / "manifest.json").exists():
        if opts.init == "random":  # seeded random weights: no training, no torchrec
            source = ["--init", "random", "--seed", str(opts.seed), "--gen-device", opts.device]
        else:
            source = ["--state-dict", str(ensure_state_dict(opts))]
        rows = ["--max-rows", str(opts.max_rows)] if opts.max_rows else []
        cap = shard_memory_for(opts, strategy, shards)
        mem = ["--shard-memory", cap] if cap else []
        _recserve(
            "export", "--workload", opts.workload, *rows, *source, "--out", str(out),
            "--strategy", strategy, "--shards", str(shards), "--dtype", opts.dtype, *mem, "--force",
        )  # fmt: skip
    return out


def monolith_package(opts: BenchOptions) -> Path:
    """The package the monolith serves: the first sharded configuration's (the same weights;
    the monolith loads every shard of any plan), so a full-size model is written once, not
    twice (52 GB of fp16 dlrmv2 leaves no room for a second copy on a 64 GiB disk); with no
    sharded configuration, a one-shard package."""
    for config in opts.configs:
        parsed = parse_config(config)
        if parsed is not None:
            return ensure_package(opts, *parsed)
    return ensure_package(opts, "singular", 1)


def read_plan(package: Path) -> ShardPlan:
    """The sharding plan of a package, read from its manifest (no torch needed)."""
    raw = json.loads((package / "manifest.json").read_text())
    return ShardPlan.from_json(raw["plan"])


def _plan_key(plan: ShardPlan) -> str:
    shards = [sorted((s.table, s.row_start, s.row_end) for s in sh.slices) for sh in plan.shards]
    return json.dumps(sorted(shards))


def idle_cpu(config: str, target, seconds: float) -> float:
    """CPU ms per second of the serving processes while no request is sent, printed per role
    (loadtest.cpu.role_of): what a Ray replica costs at rest (Ray's 10 ms signal check, metrics,
    health checks), which every request at a low rate carries a share of (each run's idle_ms_per_req)."""
    time.sleep(1.0)  # the warm-up's stragglers finish
    before, t0 = target.cpu.read_by_role(), time.monotonic()
    time.sleep(seconds)
    after, dt = target.cpu.read_by_role(), time.monotonic() - t0
    idle = {r: (after[r] - before.get(r, 0.0)) / dt * 1e3 for r in sorted(after)}
    parts = "; ".join(f"{r} {v:.1f}" for r, v in idle.items())
    total = sum(idle.values())
    print(f"  {config:>12}   idle: {total:.1f} ms of CPU a second with no requests ({parts})", flush=True)
    return total


def measure(
    config: str,
    target,
    trace: Trace,
    opts: BenchOptions,
    *,
    plan: ShardPlan | None,
) -> list[RunSummary]:
    """Warm ``target`` up, then one open-loop run per rate and one closed-loop run."""
    fan = fanout(trace, plan) if plan is not None else None
    payloads = trace.payloads
    codes = asyncio.run(warm_up(target.address, payloads, opts.warmup_requests, timeout_s=30.0))
    bad = [c for c in codes if c != "OK"]
    if bad:
        print(f"  warm-up: {len(bad)}/{len(codes)} failed ({bad[0]})", flush=True)
    idle = idle_cpu(config, target, opts.idle_s) if opts.idle_s else None
    rows = []
    runs: list[tuple[str, float | int]] = [("open", r) for r in opts.rates]
    if opts.closed_concurrency:
        runs.append(("closed", opts.closed_concurrency))
    start = 0
    metrics_url = getattr(target, "metrics_url", None)  # the stage histograms (serving/engine/stages.py)
    for mode, x in runs:
        time.sleep(max(0.5, target.metrics_delay_s if metrics_url else 0))  # stragglers drain, metrics arrive
        stages0 = stage_totals(metrics_url) if metrics_url else {}
        cpu0, me0, roles0 = target.cpu.read(), self_cpu_s(), target.cpu.read_by_role()
        gpu = GpuSampler() if opts.device != "cpu" else None
        if gpu:
            gpu.__enter__()
        if mode == "open":
            run = asyncio.run(
                open_loop(
                    target.address, payloads, rate=float(x), duration_s=opts.duration_s,
                    max_requests=opts.max_requests, timeout_s=opts.timeout_s,
                    arrivals=opts.arrivals, seed=opts.seed, start_index=start,
                )
            )  # fmt: skip
        else:
            run = asyncio.run(
                closed_loop(
                    target.address, payloads, concurrency=int(x), duration_s=opts.duration_s,
                    max_requests=opts.max_requests, timeout_s=opts.timeout_s, start_index=start,
                )
            )  # fmt: skip
        if gpu:
            gpu.__exit__(None, None, None)
        cpu_s, client_s = target.cpu.read() - cpu0, self_cpu_s() - me0
        row = summarize(config, run, fanout=fan, cpu_s=cpu_s, client_cpu_s=client_s, examples=trace.batch_sizes)
        row.loadavg_1m = os.getloadavg()[0]
        row.gpu_util = gpu.mean if gpu else float("nan")
        ok = max(row.ok, 1)
        roles = target.cpu.read_by_role()
        row.cpu_by_process = "; ".join(f"{r} {(roles[r] - roles0.get(r, 0.0)) / ok * 1e3:.2f}" for r in sorted(roles))
        if idle is not None and row.throughput_rps > 0:
            row.idle_ms_per_req = idle / row.throughput_rps
        if metrics_url:
            time.sleep(target.metrics_delay_s)  # Ray's metrics reach its exporter every second or so
            row.stages = format_breakdown(breakdown(stages0, stage_totals(metrics_url), row.ok))
        rows.append(row)
        print(
            f"  {config:>12} {mode:>6} {'c=' + str(x) if mode == 'closed' else f'{x:g}/s':>8}: "
            f"{row.throughput_rps:7.1f} ok/s  {row.examples_per_s:9,.0f} ex/s  p50 {row.p50_ms:7.1f}  p99 {row.p99_ms:7.1f} ms  "
            f"errors {row.errors or '-'}  cpu {row.cpu_ms_per_req:.2f} ms/req  load {row.loadavg_1m:.1f}",
            flush=True,
        )
    return rows


def run_bench(opts: BenchOptions) -> list[RunSummary]:
    from loadtest.targets import MonolithServer, ServeStack, TargetError, feature_filter_of

    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    workload = load_workload(opts.workload).with_max_rows(opts.max_rows)
    print(f"trace: {opts.trace_size} requests of {workload.name} (seed {opts.seed})", flush=True)
    trace = make_trace(workload, opts.trace_size, seed=opts.seed)
    print(
        f"  {trace.batch_sizes.mean():.0f} examples/request on average, "
        f"{trace.request_bytes.mean() / 1024:.1f} KiB/request",
        flush=True,
    )
    _write_run_info(opts, out)
    rows: list[RunSummary] = []
    seen: dict[str, str] = {}
    failed: dict[str, str] = {}
    for config in opts.configs:
        parsed = parse_config(config)
        if parsed is None:
            package = monolith_package(opts)
            print(f"[{config}] package {package}", flush=True)
            try:
                with MonolithServer(package, log_dir=logs, device=opts.device,
                                    feature_filter=feature_filter_of(opts.serve_args)) as target:
                    _check_rows(trace, target.info)
                    rows += measure(config, target, trace, opts, plan=None)
            except TargetError as e:
                failed[config] = str(e).splitlines()[0]
                print(f"[{config}] FAILED: {e}", flush=True)
            _write_outputs(rows, out, workload.name, failed, quiet=True)
            _discard(opts, package)
            continue
        strategy, shards = parsed
        key = _plan_key(plan_for(opts, strategy, shards))
        if key in seen:
            print(f"[{config}] same plan as {seen[key]}: not run again", flush=True)
            continue
        seen[key] = config
        package = ensure_package(opts, strategy, shards)
        plan = read_plan(package)
        print(f"[{config}] package {package} ({plan.num_shards} shard(s))", flush=True)
        try:
            with ServeStack(
                package, name=config, log_dir=logs, env=dict(opts.serve_env), extra_args=opts.serve_args,
                device=opts.device,
            ) as target:
                _check_rows(trace, target.info)
                print("  serving processes: " + "; ".join(target.processes()), flush=True)
                rows += measure(config, target, trace, opts, plan=plan)
        except TargetError as e:  # one configuration that cannot start does not sink the others
            failed[config] = str(e).splitlines()[0]
            print(f"[{config}] FAILED: {e}", flush=True)
        _write_outputs(rows, out, workload.name, failed, quiet=True)
        _discard(opts, package)
    _write_outputs(rows, out, workload.name, failed)
    return rows


def _discard(opts: BenchOptions, package: Path) -> None:
    if opts.discard_packages:
        import shutil

        shutil.rmtree(package, ignore_errors=True)
        print(f"  removed {package} (--discard-packages)", flush=True)


def _write_outputs(rows: list[RunSummary], out: Path, name: str, failed: dict[str, str], *, quiet: bool = False) -> None:
    """CSV, plot and tables of the rows so far (rewritten after every configuration)."""
    if not rows:
        return
    fill_cpu_overhead(rows)
    write_csv(rows, out / "bench.csv")
    plot_p99(rows, out / "p99.png", title=f"{name}: P99 latency vs offered load")
    notes = "".join(f"\n- {c}: not measured ({why})" for c, why in failed.items()) + _scale_notes(out)
    stages = _stage_lines(rows)
    (out / "table.md").write_text(format_table(rows, markdown=True) + "\n" + notes + ("\n" if notes else "")
                                  + (f"\nPer-stage mean ms (xN: observations per request)\n\n```\n{stages}\n```\n"
                                     if stages else ""))
    table = format_table(rows) + (f"\n\nper-stage mean ms (xN: observations per request)\n{stages}" if stages else "")
    (out / "table.txt").write_text(table + "\n" + notes + ("\n" if notes else ""))
    if not quiet:
        print(table + notes)
        print(f"wrote {out / 'bench.csv'}, {out / 'p99.png'}, {out / 'table.md'}")


def _stage_lines(rows: list[RunSummary]) -> str:
    """One line per run: where its requests' milliseconds went (the servers' stage histograms)."""
    return "\n".join(f"{r.config:>12} {r.mode:>6} {('c=' + str(r.concurrency)) if r.mode == 'closed' else f'{r.offered_rps:g}/s':>6}"
                     f"  {r.stages}" for r in rows if r.stages)


def _scale_notes(out: Path) -> str:
    """For scale, under every table: MLPerf's per-GPU figure, and the in-process (engine-only)
    figures of this GPU when an engine run wrote engine.json to the same directory."""
    lines = [f"\n- for scale: MLPerf Inference v5.0, H200, DLRMv2 server (TensorRT, int8, P99 <= 60 ms): "
             f"~{MLPERF_H200_EXAMPLES_PER_S / 1e6:.1f}M examples/s per GPU"]
    engine = out / "engine.json"
    if engine.exists():
        raw = json.loads(engine.read_text())
        for r in raw["rows"]:
            plain = f", plain torch {r['plain_eps'] / 1e6:.2f}M" if r.get("plain_eps") else ""
            lines.append(f"\n- in process on {raw['device']} (recserve bench --engine), batch {r['batch']:,}: "
                         f"engine {r['engine_eps'] / 1e6:.2f}M examples/s{plain}")
    return "".join(lines)


def _source_version() -> str:
    """The code under test: $RECSERVE_BENCH_SOURCE (a snapshot's commit) or `git describe`."""
    if os.environ.get("RECSERVE_BENCH_SOURCE"):
        return os.environ["RECSERVE_BENCH_SOURCE"]
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _write_run_info(opts: BenchOptions, out: Path) -> None:
    import dataclasses
    import platform

    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    info.update(
        source=_source_version(),
        started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        cpus=os.cpu_count(),
        machine=platform.platform(),
        loadavg_at_start=os.getloadavg(),
        command="recserve bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
    )
    (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")


def _check_rows(trace: Trace, info) -> None:
    """Refuse a trace with ids the served tables do not have (would be all errors)."""
    capped = cap_rows_to_served(trace.workload, info)
    if capped != trace.workload:
        too_big = [t.name for t, c in zip(trace.workload.tables, capped.tables) if t.rows != c.rows]
        raise BenchError(f"the served model has fewer rows than the trace's workload in tables {too_big}")
