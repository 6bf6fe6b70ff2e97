"""Streaming guardrail statistics for a feature being faded, and the breach test.

For every scored example the router knows its cohort for the feature (control, kept,
faded; see policy.py). Per cohort we keep a count, the sum of scores and a histogram of
the scores in logit space (PSI bins); per request, whether any example had the feature
faded and the request's latency. From those:

    ratio        = mean score(faded) / mean score(control)     (1.0 = no shift)
    ratio_kept   = mean score(kept)  / mean score(control)     (an A/A check)
    psi          = PSI(faded, control) over the score histograms
    latency_ratio= mean latency(requests with faded examples) / mean latency(others)

The control cohort is held at full coverage and drawn independently of the keep decision,
so faded and control examples differ only by the feature: a shift in ``ratio`` or ``psi``
is the feature's effect. Statistics restart whenever the feature's coverage changes, so a
step is judged by its own traffic. Everything is O(1) memory per feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from serving.fading.policy import CONTROL, FADED, KEPT
from serving.fading.schedule import Thresholds

# PSI bins over the logit of the score: 30 bins on [-6, 6] plus two open-ended ones.
_EDGES = np.linspace(-6.0, 6.0, 31)  # [31]
NUM_BINS = len(_EDGES) + 1
_PSI_EPS = 1e-4  # floor of a bin's share, so empty bins give a finite PSI


def score_bins(scores: np.ndarray) -> np.ndarray:
    """PSI bin of every score: int64 [B] in [0, NUM_BINS)."""
    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.searchsorted(_EDGES, np.log(p / (1 - p)))


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two histograms (counts); 0 = identical shares."""
    e = np.maximum(expected / max(expected.sum(), 1), _PSI_EPS)
    a = np.maximum(actual / max(actual.sum(), 1), _PSI_EPS)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class CohortStats:
    count: int = 0
    score_sum: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, np.int64))  # [NUM_BINS]

    def add(self, scores: np.ndarray) -> None:
        if scores.size:
            self.count += int(scores.size)
            self.score_sum += float(scores.sum(dtype=np.float64))
            self.hist += np.bincount(score_bins(scores), minlength=NUM_BINS)

    @property
    def mean(self) -> float:
        return self.score_sum / self.count if self.count else math.nan


@dataclass
class LatencyStats:
    count: int = 0
    total_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else math.nan


@dataclass(frozen=True)
class Figures:
    """A snapshot of one feature's guardrail figures (NaN where not measurable yet)."""

    coverage: float
    examples: dict[str, int]  # cohort name -> examples seen
    mean_score: dict[str, float]  # cohort name -> mean score
    ratio: float
    ratio_kept: float
    psi: float
    latency_ratio: float
    requests_with_faded: int
    requests_without: int
    lookups_skipped: int
    seconds: float  # how long these statistics have been collected

    @property
    def lookups_skipped_per_s(self) -> float:
        return self.lookups_skipped / self.seconds if self.seconds > 0 else math.nan

    def to_json(self) -> dict:
        def clean(x: float) -> float | None:
            return None if isinstance(x, float) and math.isnan(x) else x

        return {
            "coverage": self.coverage,
            "examples": self.examples,
            "mean_score": {k: clean(v) for k, v in self.mean_score.items()},
            "ratio": clean(self.ratio),
            "ratio_kept": clean(self.ratio_kept),
            "psi": clean(self.psi),
            "latency_ratio": clean(self.latency_ratio),
            "requests_with_faded": self.requests_with_faded,
            "requests_without": self.requests_without,
            "lookups_skipped": self.lookups_skipped,
            "seconds": self.seconds,
        }


class FeatureGuardrail:
    """Streaming statistics of one feature at one coverage, and the breach test."""

    def __init__(self, coverage: float, started_at: float = 0.0):
        self.coverage = coverage
        self.started_at = started_at
        self.cohorts = {CONTROL: CohortStats(), KEPT: CohortStats(), FADED: CohortStats()}
        self.latency_faded = LatencyStats()  # requests with at least one faded example
        self.latency_other = LatencyStats()
        self.lookups_skipped = 0

    def observe(self, cohorts: np.ndarray, scores: np.ndarray, latency_s: float | None, skipped: int) -> None:
        """One scored request: cohorts int8 [B], scores float32 [B], its latency."""
        for code, stats in self.cohorts.items():
            stats.add(scores[cohorts == code])
        if latency_s is not None:
            (self.latency_faded if (cohorts == FADED).any() else self.latency_other).add(latency_s)
        self.lookups_skipped += skipped

    def figures(self, now: float | None = None) -> Figures:
        c, k, f = (self.cohorts[x] for x in (CONTROL, KEPT, FADED))
        ratio = f.mean / c.mean if f.count and c.count and c.mean > 0 else math.nan
        ratio_kept = k.mean / c.mean if k.count and c.count and c.mean > 0 else math.nan
        lat = (
            self.latency_faded.mean_s / self.latency_other.mean_s
            if self.latency_faded.count and self.latency_other.count and self.latency_other.mean_s > 0
            else math.nan
        )
        return Figures(
            coverage=self.coverage,
            examples={"control": c.count, "kept": k.count, "faded": f.count},
            mean_score={"control": c.mean, "kept": k.mean, "faded": f.mean},
            ratio=ratio,
            ratio_kept=ratio_kept,
            psi=psi(c.hist, f.hist) if f.count and c.count else math.nan,
            latency_ratio=lat,
            requests_with_faded=self.latency_faded.count,
            requests_without=self.latency_other.count,
            lookups_skipped=self.lookups_skipped,
            seconds=max(0.0, (now if now is not None else self.started_at) - self.started_at),
        )

    def breach(self, t: Thresholds) -> str | None:
        """Why the thresholds are breached, or None (also None while samples are too few)."""
        fig = self.figures()
        c, f = self.cohorts[CONTROL], self.cohorts[FADED]
        why = []
        if c.count >= t.min_examples and f.count >= t.min_examples:
            if abs(fig.ratio - 1.0) > t.max_mean_shift:
                why.append(
                    f"mean score ratio faded/control {fig.ratio:.4f} is off by more than {t.max_mean_shift:g}"
                    f" (faded {f.mean:.4f}, control {c.mean:.4f}, n={f.count}/{c.count})"
                )
            if fig.psi > t.max_psi:
                why.append(f"score PSI faded vs control {fig.psi:.4f} > {t.max_psi:g}")
        if min(self.latency_faded.count, self.latency_other.count) >= t.min_requests:
            if fig.latency_ratio > t.max_latency_ratio:
                why.append(f"latency ratio {fig.latency_ratio:.3f} > {t.max_latency_ratio:g}")
        return "; ".join(why) or None
