"""Synthetic examples and traffic drawn from a workload.

Two uses share one generator of ids:
- :class:`TrafficGenerator` makes request batches shaped like the workload (batch sizes
  from ``samples_per_request``, ids per table from its distribution, bag sizes around the
  table's pooling factor, dense features standard normal). Load tests and benchmarks
  replay its traces; a seed makes a trace reproducible.
- :class:`ClickModel` is a hidden ground truth: the click probability of an example is a
  fixed function of its dense features and of per-id affinities, so a model trained on
  its labels learns something real (held-out AUC well above 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recserve.batch import Bags, Batch
from recserve.workloads import TableConfig, WorkloadConfig

# Knuth's multiplicative-hash prime; larger than any table, so rank -> id is a bijection
# on [0, rows) and hot ids are spread over the whole table (and over row-wise shards).
_SPREAD = 2_654_435_761


def zipf_ids(rng: np.random.Generator, rows: int, n: int, alpha: float) -> np.ndarray:
    """n ids in [0, rows) with P(rank k) ~ k^-alpha (bounded, continuous inverse CDF)."""
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-9:
        ranks = np.power(float(rows), u)
    else:
        a = 1.0 - alpha
        ranks = np.power((np.power(float(rows), a) - 1.0) * u + 1.0, 1.0 / a)
    ranks = np.minimum(ranks.astype(np.int64) - 1, rows - 1)  # [n] in [0, rows)
    return (ranks * _SPREAD + 12345) % rows


def bag_lengths(rng: np.random.Generator, pooling_factor: float, batch_size: int) -> np.ndarray:
    """Bag sizes with mean ``pooling_factor``: exactly 1 for one-hot, 1 + Poisson otherwise."""
    if pooling_factor <= 1.0:
        return np.ones(batch_size, np.int32)
    return (1 + rng.poisson(pooling_factor - 1.0, batch_size)).astype(np.int32)


@dataclass
class TrafficGenerator:
    """Request batches shaped like ``workload``; same seed, same trace."""

    workload: WorkloadConfig
    seed: int = 0
    empty_bag_fraction: float = 0.0  # share of bags sent empty (missing feature)
    id_shift: int = 0  # ids move by this much (mod rows): other ids become hot (a drifting world) ...
    shifted_fraction: float = 1.0  # ... for this fraction of the draws (the rest keep the usual ids)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def ids(self, table: TableConfig, n: int) -> np.ndarray:
        if self.workload.ids == "zipf":
            ids = zipf_ids(self.rng, table.rows, n, self.workload.zipf_alpha)
        else:
            ids = self.rng.integers(0, table.rows, n, dtype=np.int64)
        if not self.id_shift:
            return ids
        moved = self.rng.random(n) < self.shifted_fraction  # [n]
        return np.where(moved, (ids + self.id_shift) % table.rows, ids)

    def batch_size(self) -> int:
        lo, hi = self.workload.samples_per_request
        return int(self.rng.integers(lo, hi + 1))

    def batch(self, batch_size: int | None = None) -> Batch:
        b = self.batch_size() if batch_size is None else batch_size
        dense = self.rng.standard_normal((b, self.workload.dense_features), dtype=np.float32)
        sparse = {}
        for table in self.workload.tables:
            for feature in table.features:
                lengths = bag_lengths(self.rng, table.pooling_factor, b)
                if self.empty_bag_fraction > 0:
                    lengths[self.rng.random(b) < self.empty_bag_fraction] = 0
                sparse[feature] = Bags(self.ids(table, int(lengths.sum())), lengths)
        unit_ids = self.rng.integers(0, 2**63 - 1, b, dtype=np.int64).astype(np.uint64)
        return Batch(dense, sparse, unit_ids)

    def trace(self, num_requests: int) -> list[Batch]:
        return [self.batch() for _ in range(num_requests)]


def _hash_unit(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 x, mapped to a float in [-sqrt(3), sqrt(3)) (var 1)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) / 2.0**53 - 0.5) * 2.0 * np.sqrt(3.0)


@dataclass
class ClickModel:
    """Hidden ground truth: P(click) = sigmoid(dense part + id affinities + one cross term).

    ``drift`` (radians per day) makes it a drifting world: at ``day`` every id's affinity and
    the dense weights are ``cos(drift * day) * initial + sin(drift * day) * other`` (two
    independent draws), so tastes change smoothly and a model trained on old days goes stale.
    """

    workload: WorkloadConfig
    seed: int = 0
    drift: float = 0.0  # radians per day
    day: float = 0.0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed + 1_000_003)
        f = self.workload.dense_features
        self.dense_w = rng.standard_normal(f) / np.sqrt(f)  # [F]
        n = len(self.workload.features)
        self.feature_w = rng.uniform(0.5, 1.0, n) * rng.choice([-1.0, 1.0], n)  # [n_features]
        self.bias = -1.0
        theta = self.drift * self.day
        self._mix = (np.cos(theta), np.sin(theta))
        if theta:
            other = np.random.default_rng(self.seed + 2_000_003).standard_normal(f) / np.sqrt(f)
            self.dense_w = self._mix[0] * self.dense_w + self._mix[1] * other

    def at(self, day: float) -> ClickModel:
        """The same world on another day."""
        return ClickModel(self.workload, self.seed, self.drift, day)

    def _affinity(self, i: int, bags: Bags) -> np.ndarray:
        """Mean hidden affinity of each example's ids for feature i: float64 [B]."""
        key = bags.values.astype(np.uint64) * np.uint64(1_000_003) + np.uint64(i * 7919 + self.seed)
        a = _hash_unit(key)
        if self._mix[1]:
            a = self._mix[0] * a + self._mix[1] * _hash_unit(key ^ np.uint64(0xD1F7D1F7D1F7))
        sums = np.zeros(bags.batch_size)
        np.add.at(sums, np.repeat(np.arange(bags.batch_size), bags.lengths), a)
        return sums / np.maximum(bags.lengths, 1)

    def logits(self, batch: Batch) -> np.ndarray:
        out = batch.dense.astype(np.float64) @ self.dense_w + self.bias  # [B]
        aff = [self._affinity(i, batch.sparse[f]) for i, f in enumerate(self.workload.features)]
        for w, a in zip(self.feature_w, aff):
            out += w * a
        if len(aff) >= 2:
            out += 0.75 * aff[0] * aff[1]
        return out

    def labels(self, batch: Batch, rng: np.random.Generator) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-self.logits(batch)))
        return (rng.random(p.shape[0]) < p).astype(np.float32)  # [B]


# --- The ExFM world: verticals and a drift a score can correct (issue 20) ---------------------------------


@dataclass(frozen=True)
class Vertical:
    """One vertical (one student's traffic): its own click-rate offset and its own weight on one
    feature's affinity. A teacher trained on pooled traffic without the vertical id sees neither."""

    name: str
    bias: float  # added to every logit of this vertical
    feature_weight: float  # multiplies the weight of the world's ``vertical_feature`` affinity
    share: float = 1.0  # relative share of the pooled traffic


VERTICALS = (Vertical("v0-typical", 0.0, 1.0), Vertical("v1-low", -1.2, 0.2), Vertical("v2-high", 0.9, 1.8))


@dataclass
class ExFMWorld:
    """The hidden ground truth of several verticals, drifting by day.

    logit(x, v, d) = exp(scale_trend d) * core_d(x, v) + bias + bias_v + bias_trend d
    core_d(x, v)   = ClickModel(rotation).at(d) without its bias, with the affinity of feature
                     ``vertical_feature`` weighted feature_weight_v times as much

    Three kinds of drift: the rotation (tastes change: no score of an old snapshot can follow
    it), the bias trend and the logit-scale trend (a stale score is off by an affine map that
    grows with its age: what a student adapter can correct). The truth changes once a day.
    """

    workload: WorkloadConfig
    seed: int = 0
    verticals: tuple[Vertical, ...] = VERTICALS
    rotation: float = 0.02  # radians per day
    bias_trend: float = 0.12  # logit per day
    scale_trend: float = 0.06  # log of the logit scale per day
    vertical_feature: int = 1  # the feature whose weight differs by vertical (tiny: item_id)

    def __post_init__(self) -> None:
        if not self.verticals:
            raise ValueError("ExFMWorld: needs at least one vertical")
        if not 0 <= self.vertical_feature < len(self.workload.features):
            raise ValueError(f"vertical_feature: {self.vertical_feature} is not a feature index of "
                             f"{self.workload.name} ({len(self.workload.features)} features)")
        self._days: dict[int, ClickModel] = {}

    def vertical_index(self, vertical: int | str) -> int:
        """The index of a vertical given by name or index (a digit string counts as an index)."""
        names = [v.name for v in self.verticals]
        if isinstance(vertical, str) and vertical in names:
            return names.index(vertical)
        try:
            i = int(vertical)
        except ValueError:
            i = -1
        if not 0 <= i < len(names):
            raise ValueError(f"vertical: {vertical!r} is none of {', '.join(names)} (or 0 to {len(names) - 1})")
        return i

    def _base(self, day: int) -> ClickModel:
        if day not in self._days:
            self._days[day] = ClickModel(self.workload, self.seed, drift=self.rotation, day=float(day))
        return self._days[day]

    def logits(self, batch: Batch, vertical: int, day: int) -> np.ndarray:
        """True logits float64 [B] of a batch of vertical ``vertical`` on day ``day``."""
        v = self.verticals[vertical]
        cm = self._base(int(day))
        core = cm.logits(batch) - cm.bias
        if v.feature_weight != 1.0:
            f = self.vertical_feature
            core += (v.feature_weight - 1.0) * cm.feature_w[f] * cm._affinity(f, batch.sparse[self.workload.features[f]])
        return np.exp(self.scale_trend * day) * core + cm.bias + v.bias + self.bias_trend * day

    def probs(self, batch: Batch, vertical: int, day: int) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(batch, vertical, day)))

    def traffic(self, vertical: int, day: int, n: int, stream: int = 0) -> tuple[Batch, np.ndarray]:
        """n fresh examples of ``vertical`` on ``day`` and their log times in days (sorted, in
        [day, day + 1)). ``stream`` picks an independent draw (training, validation, ...)."""
        key = ((self.seed * 1_000 + stream) * 1_000 + vertical) * 100_000 + day
        gen = TrafficGenerator(self.workload, seed=key)
        batch = gen.batch(n)
        return batch, day + np.sort(gen.rng.random(n))

    def labels(self, batch: Batch, vertical: int, day: int, rng: np.random.Generator) -> np.ndarray:
        p = self.probs(batch, vertical, day)
        return (rng.random(p.shape[0]) < p).astype(np.float32)

    def pooled_share(self) -> np.ndarray:
        s = np.array([v.share for v in self.verticals], np.float64)
        return s / s.sum()

    def pooled_logits(self, batch: Batch, day: int) -> np.ndarray:
        """The best score a model of the pooled traffic can give without the vertical id: the
        logit of the share-weighted mean click probability over verticals, float64 [B]."""
        p = sum(w * self.probs(batch, v, day) for v, w in enumerate(self.pooled_share()))
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return np.log(p) - np.log1p(-p)


def fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 30, l2: float = 1e-6) -> np.ndarray:
    """Logistic regression by Newton's method: weights [K] of features x [N, K] (include a
    column of ones for an intercept) for soft or hard targets y [N] in [0, 1]."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        g = x.T @ (p - y) + l2 * w
        h = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def recalibration_features(logit: np.ndarray, age: np.ndarray | None = None) -> np.ndarray:
    """[t, 1] or, with the snapshot's age, [t, age t, 1, age]: the affine maps a student adapter
    (``affine``) can express."""
    t = np.asarray(logit, np.float64)
    if age is None:
        return np.stack([t, np.ones_like(t)], axis=1)
    a = np.asarray(age, np.float64)
    return np.stack([t, a * t, np.ones_like(t), a], axis=1)


def cross_entropy_ne(p_true: np.ndarray, p_model: np.ndarray) -> float:
    """NE against the true click probabilities: expected log loss of ``p_model`` when clicks are
    drawn with ``p_true``, over the entropy of the mean true rate (no label noise)."""
    p = np.clip(np.asarray(p_model, np.float64), 1e-7, 1 - 1e-7)
    q = np.asarray(p_true, np.float64)
    rate = q.mean()
    ll = -(q * np.log(p) + (1 - q) * np.log(1 - p)).mean()
    return float(ll / -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def world_ceilings(world: ExFMWorld, *, snapshot_every: int = 3, delay: float = 1.0, first_day: int = 9,
                   days: int = 4, n: int = 20_000) -> list[dict]:
    """The power check in numpy: what each ExFM mechanism could at best gain in ``world``,
    with the best pooled teacher there is (no training noise), per vertical, NE against the true
    probabilities on ``days`` days of fresh traffic from ``first_day`` (the students' days):

    - ``ah_ceiling``: raw stale teacher minus the teacher recalibrated per vertical (affine in its
      logit, fit on the vertical's labels): the bias an auxiliary head keeps from the serving head
    - ``sa_ceiling``: raw stale teacher minus the teacher recalibrated per vertical with the
      snapshot's age as well (what an affine student adapter can reach)
    - ``sa_age_part``: the age's own share (recalibrated without age minus with age)
    - ``freshness_gap``: the stale teacher recalibrated with age minus a fresh teacher (the
      pooled truth of the day itself, recalibrated the same way): what no adapter can close
    """

    rng = np.random.default_rng(world.seed + 77)
    out = []
    for v, vert in enumerate(world.verticals):
        t, age, q, y, fresh = [], [], [], [], []
        for d in range(first_day, first_day + days):
            b, times = world.traffic(v, d, n, stream=9)
            snap_end, snap_age = snapshot_of(times, snapshot_every=snapshot_every, delay=delay)
            logit = np.empty(b.batch_size)
            for e in np.unique(snap_end):
                rows = np.flatnonzero(snap_end == e)
                logit[rows] = world.pooled_logits(b.take(rows), int(e) - 1)  # trained through day e - 1
            p = world.probs(b, v, d)
            t.append(logit), age.append(snap_age), q.append(p), fresh.append(world.pooled_logits(b, d))
            y.append((rng.random(p.shape[0]) < p).astype(np.float64))
        t, age, q, y, fresh = map(np.concatenate, (t, age, q, y, fresh))
        fit, ev = slice(0, None, 2), slice(1, None, 2)  # fit on one half, measure on the other

        def recal(feats: np.ndarray) -> np.ndarray:
            w = fit_logistic(feats[fit], y[fit])
            return _sigmoid(feats[ev] @ w)

        raw = cross_entropy_ne(q[ev], _sigmoid(t[ev]))
        vert_only = cross_entropy_ne(q[ev], recal(recalibration_features(t)))
        with_age = cross_entropy_ne(q[ev], recal(recalibration_features(t, age)))
        fresh_ne = cross_entropy_ne(q[ev], recal(recalibration_features(fresh)))
        truth = cross_entropy_ne(q[ev], q[ev])
        out.append(dict(vertical=vert.name, teacher_raw=raw, recalibrated=vert_only, recalibrated_with_age=with_age,
                        fresh_recalibrated=fresh_ne, truth=truth, ah_ceiling=raw - vert_only,
                        sa_ceiling=raw - with_age, sa_age_part=vert_only - with_age,
                        freshness_gap=with_age - fresh_ne, age_min=float(age.min()), age_max=float(age.max())))
    return out


def snapshot_of(times: np.ndarray, *, snapshot_every: int, delay: float) -> tuple[np.ndarray, np.ndarray]:
    """The newest teacher snapshot at each log time (days): snapshots are trained through the
    end of day e - 1 for e = k * snapshot_every and published ``delay`` days later. Returns the
    snapshot's data end e (int [N]) and its age at log time, t - e (float [N], days)."""
    t = np.asarray(times, np.float64)
    end = np.floor((t - delay) / snapshot_every).astype(np.int64) * snapshot_every
    if (end <= 0).any():
        raise ValueError(f"no teacher snapshot is published before day {delay + snapshot_every:g}")
    return end, t - end
