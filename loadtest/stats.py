"""Latency percentiles and the summary row of one run (one configuration at one rate)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from loadtest.driver import RunRecord
from loadtest.trace import Fanout


def percentiles_ms(latency_s: np.ndarray, qs: tuple[float, ...] = (50, 95, 99)) -> tuple[float, ...]:
    """Percentiles (linear interpolation) of ``latency_s`` in milliseconds; NaN when empty."""
    x = np.asarray(latency_s, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return tuple(float("nan") for _ in qs)
    return tuple(float(v) * 1e3 for v in np.percentile(x, qs))


def error_counts(codes: tuple[str, ...]) -> dict[str, int]:
    """Requests by status code, OK left out."""
    return dict(sorted((c, n) for c, n in Counter(codes).items() if c != "OK"))


@dataclass
class RunSummary:
    """One row of the benchmark table and CSV."""

    config: str  # "monolith", "table-2", ...
    mode: str  # "open" or "closed"
    offered_rps: float  # open loop: offered rate; closed loop: NaN
    concurrency: int  # closed loop: workers; open loop: 0
    sent: int  # requests sent
    ok: int  # answered OK
    errors: str  # "DEADLINE_EXCEEDED:3;UNAVAILABLE:1" ("" when none)
    throughput_rps: float  # OK answers per second of wall time
    examples_per_s: float  # examples (user-item pairs) of the OK answers per second of wall time
    p50_ms: float  # latency of OK answers from their scheduled send time
    p95_ms: float
    p99_ms: float
    mean_ms: float
    sender_lag_p99_ms: float  # P99 of (actual - scheduled) send time: the client falling behind
    shard_calls_per_req: float  # mean shards called per request (0 for the monolith)
    req_bytes_per_req: float  # mean serialized request size
    resp_bytes_per_req: float  # mean serialized response size
    internal_bytes_per_req: float  # mean estimated bytes between deployments (0 for the monolith)
    cpu_s: float  # CPU busy seconds of the server processes during the run
    cpu_ms_per_req: float  # cpu_s / OK answers, in ms
    cpu_overhead: float  # cpu_ms_per_req / the monolith's at the same rate (NaN if unknown)
    client_cpu_s: float  # CPU seconds of the load generator during the run
    loadavg_1m: float = float("nan")  # machine load average at the end of the run (noise check)
    gpu_util: float = float("nan")  # mean GPU utilisation during the run, % (NaN: no GPU sampled)
    cpu_by_process: str = ""  # CPU ms per OK answer of each serving process, "Router 2.10; shard-0 0.80"
    # of cpu_ms_per_req, what the serving processes burn whatever the load: their CPU rate with no
    # requests (measured before the runs) over this run's OK answers per second (NaN: not measured)
    idle_ms_per_req: float = float("nan")
    stages: str = ""  # mean ms per stage (serving/engine/stages.py), "decode 0.40  coalesce_wait 1.20 ..."

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(
    config: str,
    run: RunRecord,
    *,
    fanout: Fanout | None = None,
    cpu_s: float = float("nan"),
    client_cpu_s: float = float("nan"),
    examples: np.ndarray | None = None,
) -> RunSummary:
    """``examples``: int [trace size] examples of each trace request (for examples/s)."""
    ok_mask = np.array([c == "OK" for c in run.codes], bool)
    ok = int(ok_mask.sum())
    p50, p95, p99 = percentiles_ms(run.latency_s[ok_mask])
    lag = run.latency_s - run.service_s  # [n] actual send - scheduled send
    (lag99,) = percentiles_ms(lag, (99,))
    if fanout is not None and len(run):
        calls = float(fanout.shard_calls[run.trace_index].mean())
        internal = float(fanout.internal_bytes[run.trace_index].mean())
    else:
        calls, internal = 0.0, 0.0
    n = max(len(run), 1)
    return RunSummary(
        config=config,
        mode=run.mode,
        offered_rps=float(run.offered_rps) if run.offered_rps is not None else float("nan"),
        concurrency=int(run.concurrency or 0),
        sent=len(run),
        ok=ok,
        errors=";".join(f"{c}:{k}" for c, k in error_counts(run.codes).items()),
        throughput_rps=ok / run.wall_s if run.wall_s > 0 else float("nan"),
        examples_per_s=(float(np.asarray(examples)[run.trace_index[ok_mask]].sum()) / run.wall_s
                        if examples is not None and run.wall_s > 0 else float("nan")),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        mean_ms=float(np.mean(run.latency_s[ok_mask]) * 1e3) if ok else float("nan"),
        sender_lag_p99_ms=lag99,
        shard_calls_per_req=calls,
        req_bytes_per_req=float(run.request_bytes.sum() / n),
        resp_bytes_per_req=float(run.response_bytes[ok_mask].mean()) if ok else 0.0,
        internal_bytes_per_req=internal,
        cpu_s=cpu_s,
        cpu_ms_per_req=cpu_s / ok * 1e3 if ok else float("nan"),
        cpu_overhead=float("nan"),
        client_cpu_s=client_cpu_s,
    )


def fill_cpu_overhead(rows: list[RunSummary], baseline: str = "monolith") -> None:
    """Set each row's ``cpu_overhead`` against the baseline's row of the same mode and rate.

    Closed-loop rows compare with the baseline's closed-loop row (CPU per answered
    request, since the request counts differ).
    """
    base = {}
    for r in rows:
        if r.config == baseline:
            base[(r.mode, _rate_key(r))] = r.cpu_ms_per_req
    for r in rows:
        b = base.get((r.mode, _rate_key(r)))
        if b and np.isfinite(b) and b > 0 and np.isfinite(r.cpu_ms_per_req):
            r.cpu_overhead = r.cpu_ms_per_req / b


def _rate_key(r: RunSummary) -> float | str:
    return "closed" if r.mode == "closed" else round(r.offered_rps, 6)
