"""Prometheus metrics of feature fading, through Ray's metrics API (``ray.util.metrics``).

Inside a Ray Serve replica these are exported with Serve's own metrics (scrape the Ray
metrics port, see the Ray dashboard); outside Ray (the monolith, tests) they are kept
only in memory and shown by ``recserve fade status``.

    recserve_fading_coverage{model,feature}                gauge, current coverage
    recserve_fading_score_ratio{model,feature}             gauge, mean score faded/control
    recserve_fading_score_psi{model,feature}               gauge, PSI faded vs control
    recserve_fading_latency_ratio{model,feature}           gauge, latency with/without faded
    recserve_fading_lookups_skipped_total{model,feature}   counter; rate() = lookups skipped/s
    recserve_fading_lookups_skipped_per_second{model,feature}  gauge, over the current step
    recserve_fading_breaches_total{model,feature}          counter of guardrail breaches
"""

from __future__ import annotations

import math
import sys
from typing import Any

_TAGS = ("model", "feature")


def _ray_metrics() -> Any | None:
    """ray.util.metrics when this process is part of a Ray job, else None (never imports ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from ray.util import metrics

    return metrics


class FadingMetrics:
    """One set of fading metrics per router (or monolith) process."""

    def __init__(self) -> None:
        m = _ray_metrics()
        self.exported = m is not None
        if m is None:
            self._gauges: dict[str, Any] = {}
            self._counters: dict[str, Any] = {}
        else:
            self._gauges = {
                "coverage": m.Gauge("recserve_fading_coverage", "coverage of a faded feature", _TAGS),
                "ratio": m.Gauge("recserve_fading_score_ratio", "mean score faded / control", _TAGS),
                "psi": m.Gauge("recserve_fading_score_psi", "PSI of faded vs control scores", _TAGS),
                "latency_ratio": m.Gauge(
                    "recserve_fading_latency_ratio", "mean latency of requests with / without faded examples", _TAGS
                ),
                "lookups_skipped_per_s": m.Gauge(
                    "recserve_fading_lookups_skipped_per_second", "lookups skipped per second, current step", _TAGS
                ),
            }
            self._counters = {
                "lookups_skipped": m.Counter(
                    "recserve_fading_lookups_skipped_total", "embedding lookups not sent because of fading", _TAGS
                ),
                "breaches": m.Counter("recserve_fading_breaches_total", "guardrail breaches", _TAGS),
            }
        self.values: dict[tuple[str, str, str], float] = {}  # (name, model, feature) -> last value / total

    def set(self, name: str, model: str, feature: str, value: float) -> None:
        if isinstance(value, float) and math.isnan(value):
            return
        self.values[(name, model, feature)] = value
        g = self._gauges.get(name)
        if g is not None:
            g.set(value, tags={"model": model, "feature": feature})

    def inc(self, name: str, model: str, feature: str, value: float = 1.0) -> None:
        if value <= 0:
            return
        key = (name, model, feature)
        self.values[key] = self.values.get(key, 0.0) + value
        c = self._counters.get(name)
        if c is not None:
            c.inc(value, tags={"model": model, "feature": feature})
