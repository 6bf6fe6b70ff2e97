"""Where a request's milliseconds go: per-stage time as one Prometheus histogram,
``recserve_stage_ms{stage=...}``, recorded by both servers, and read back by ``recserve bench``.

Stages (names are data: the bench prints whatever it finds, in this order first)::

    router / monolith, per request:  admission  decode  filter  coalesce_wait  batch  encode
    monolith, per batch:             lookup  tower
    shard-K, per call:               shard-K.wait  shard-K.lookup
    DenseTower, per call:            tower.wait  tower.score

``batch`` is the coalesced batch's whole trip (in the router: the shard calls and the tower
call, as the router waits for them); the shards and the tower report their own wait (for
the batch in flight there) and work per call. In the Ray stack the histogram is Ray's
(exported with a ``ray_`` prefix by Ray's metrics agent, tagged by deployment and replica);
in the monolith it is prometheus_client's, on its own metrics port. This module is Ray-free:
the Serve replicas' observer (Ray's Histogram) is serving/app/deployments.py's ``ray_observer``.
"""

from __future__ import annotations

import re
import time
from typing import Callable

STAGE_METRIC = "recserve_stage_ms"
STAGE_DESCRIPTION = "time of one stage of a request (per request), or of one batched call (shards, tower), ms"
BOUNDARIES_MS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
ORDER = ("parse", "admission", "decode", "filter", "coalesce_wait", "batch", "lookup", "tower", "encode")

Observe = Callable[[str, float], None]  # (stage, ms)


class Stopwatch:
    """Laps of one request: ``lap("decode")`` records the time since the previous lap."""

    def __init__(self, observe: Observe):
        self.observe = observe
        self.at = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.observe(stage, (now - self.at) * 1000)
        self.at = now

    def add(self, stage: str, seconds: float) -> None:
        """A stage timed elsewhere (e.g. the coalescer's wait); the next lap starts now."""
        self.observe(stage, seconds * 1000)
        self.at = time.perf_counter()


_PROMETHEUS = None


def prometheus_observer() -> Observe:
    """The stage histogram of this process in prometheus_client's registry (one per process)."""
    global _PROMETHEUS
    if _PROMETHEUS is None:
        from prometheus_client import Histogram

        _PROMETHEUS = Histogram(STAGE_METRIC, STAGE_DESCRIPTION, ["stage"], buckets=BOUNDARIES_MS)
    h = _PROMETHEUS
    return lambda stage, ms: h.labels(stage=stage).observe(ms)


_SERIES = re.compile(r'^(?:ray_)?' + STAGE_METRIC + r'_(sum|count)\{([^}]*)\}\s+(\S+)', re.M)
_STAGE = re.compile(r'(?:^|,)stage="([^"]*)"')
# the towers' batches by how their pooled embeddings came (serving/engine/ipc.py): ipc, host,
# too_large, declined; and "quarantined", the ring slots quarantined after their batch (a batch
# counted by its path as well)
POOLED = "pooled_batches"
_POOLED_SERIES = re.compile(r'^(?:ray_)?recserve_pooled_batches(?:_total)?\{([^}]*)\}\s+(\S+)', re.M)
_QUARANTINED_SERIES = re.compile(r'^(?:ray_)?recserve_pooled_ring_quarantined(?:_total)?(?:\{[^}]*\})?\s+(\S+)', re.M)
_PATH = re.compile(r'(?:^|,)path="([^"]*)"')


def parse_totals(text: str) -> dict[str, tuple[float, float]]:
    """stage -> (observations, total ms) of the stage histogram in a Prometheus text page,
    summed over every series of that stage (replicas, deployments); and ``pooled_batches.PATH``
    -> (the towers' batches by that path, 0): a count without a time."""
    out: dict[str, list[float]] = {}
    for kind, labels, value in _SERIES.findall(text):
        m = _STAGE.search(labels)
        if m is None:
            continue
        acc = out.setdefault(m.group(1), [0.0, 0.0])
        acc[0 if kind == "count" else 1] += float(value)
    for labels, value in _POOLED_SERIES.findall(text):
        m = _PATH.search(labels)
        if m is not None:
            out.setdefault(f"{POOLED}.{m.group(1)}", [0.0, 0.0])[0] += float(value)
    for value in _QUARANTINED_SERIES.findall(text):
        out.setdefault(f"{POOLED}.quarantined", [0.0, 0.0])[0] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, tuple[float, float]]:
    """:func:`parse_totals` of the page at ``url`` (http://host:port/metrics); {} if it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return parse_totals(r.read().decode("utf-8", "replace"))
    except OSError:
        return {}


def _rank(stage: str) -> tuple:
    base = stage.rpartition(".")[2]
    owner = stage.rpartition(".")[0]
    return (owner, ORDER.index(base) if base in ORDER else len(ORDER), stage)


def breakdown(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
              requests: int) -> list[tuple[str, float, float]]:
    """(stage, observations per request, mean ms per observation) between two scrapes."""
    rows = []
    for stage in sorted(after, key=_rank):
        n = after[stage][0] - before.get(stage, (0.0, 0.0))[0]
        total = after[stage][1] - before.get(stage, (0.0, 0.0))[1]
        if n > 0:
            rows.append((stage, n / max(requests, 1), total / n))
    return rows


def format_breakdown(rows: list[tuple[str, float, float]]) -> str:
    """One line: ``stage mean-ms (xN per request)`` for each stage (``pooled_batches.PATH xN``:
    a count per request)."""
    return "  ".join(f"{s} x{per:.2f}" if s.startswith(POOLED + ".") else
                     f"{s} {ms:.2f}" + (f" (x{per:.2f})" if abs(per - 1) > 0.05 else "") for s, per, ms in rows)
