"""The door's depth at the knee of the throughput (serving/engine/concurrency.py), driven with a
simulated server and a fake clock: it comes down from a deep door to the smallest depth that
keeps the throughput, stays there through noise, goes back up when the knee moves up, and never
moves without a saturated door."""

from __future__ import annotations

import random

import numpy as np
import pytest

from serving.engine.concurrency import KneeConfig, KneeLimit

# 2 cores, the default model, the stack (benchmarks/results/overload-knee/serve): calls/s by depth
STACK_2CORE = {1: 71.7, 2: 82.0, 3: 109.9, 4: 120.7, 6: 121.1, 8: 140.3, 12: 172.0, 16: 176.1, 32: 173.2}


def curve(points: dict[int, float]):
    depths, rates = zip(*sorted(points.items()))
    return lambda d: float(np.interp(d, depths, rates))


def run(limit: KneeLimit, rate_of, seconds: float, *, now: float = 0.0, noise: float = 0.05, seed: int = 0,
        full: bool = True) -> tuple[float, list[int]]:
    """A server answering ``rate_of(depth)`` calls/s (each gap +-``noise``), its door ``full``
    throughout: the limit after each call, and the clock at the end."""
    rng = random.Random(seed)
    limit.observe(now, full=full)
    seen, end = [], now + seconds
    while now < end:
        now += rng.uniform(1 - noise, 1 + noise) / rate_of(limit.limit)
        limit.observe(now, full=full)
        limit.completed(now)
        seen.append(limit.limit)
    return now, seen


def test_a_fresh_limit_is_the_fixed_door_and_a_load_below_capacity_never_lowers_it():
    limit = KneeLimit(KneeConfig(max_limit=32))
    assert limit.limit == 32
    _, seen = run(limit, curve(STACK_2CORE), 60.0, full=False)  # never every slot working
    assert set(seen) == {32} and limit.stats.windows == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_stack_on_2_cores_settles_at_its_knee_and_keeps_its_throughput(seed):
    """From 32 the depth comes down to about 12, where the throughput is still ~98% of the best,
    and stays near it: not at 32 (the same throughput, 2.3x the latency) nor below 8."""
    limit = KneeLimit(KneeConfig(max_limit=32))
    rate_of = curve(STACK_2CORE)
    now, seen = run(limit, rate_of, 10.0, seed=seed)
    assert limit.limit < 20 and limit.stats.lowered >= 3  # within 10 s of overload
    _, seen = run(limit, rate_of, 60.0, now=now, seed=seed + 10)
    settled = seen[len(seen) // 3:]
    assert 8 <= np.median(settled) <= 16, sorted(set(settled))
    assert np.mean([rate_of(d) for d in settled]) >= 0.88 * max(STACK_2CORE.values())


def test_a_flat_curve_goes_down_to_the_least_depth_that_keeps_the_throughput():
    limit = KneeLimit(KneeConfig(max_limit=32))
    _, seen = run(limit, curve({1: 50.0, 3: 200.0, 32: 200.0}), 60.0)
    assert 3 <= np.median(seen[len(seen) // 2:]) <= 5


def test_a_gpu_like_curve_that_rises_to_the_door_keeps_the_depth_up():
    """A knee past the fixed door (throughput rising to 40 in flight): the depth stays near 32."""
    limit = KneeLimit(KneeConfig(max_limit=32))
    _, seen = run(limit, curve({1: 30.0, 40: 1200.0}), 30.0)
    assert np.median(seen[len(seen) // 2:]) >= 26


def test_a_knee_that_moves_up_is_found_by_the_probes():
    """Settled at a knee of 4, the server then gains from depth up to 24 (larger requests,
    another version): the probes find it and the depth rises."""
    limit = KneeLimit(KneeConfig(max_limit=32))
    now, seen = run(limit, curve({1: 50.0, 4: 200.0, 32: 200.0}), 30.0)
    assert np.median(seen[-200:]) <= 6
    _, seen = run(limit, curve({1: 50.0, 4: 200.0, 24: 1000.0, 32: 1000.0}), 60.0, now=now)
    assert np.median(seen[-2000:]) >= 16 and limit.stats.cycles >= 2


def test_it_goes_in_cycles_reference_descend_settle():
    limit = KneeLimit(KneeConfig(max_limit=32, hold_s=5.0))
    rate_of = curve({1: 50.0, 8: 400.0, 32: 400.0})
    now, seen = run(limit, rate_of, 12.0)
    assert limit.phase == "settled" and limit.stats.cycles == 1 and 8 <= limit.limit <= 12
    settled = limit.limit
    now, seen = run(limit, rate_of, 8.0, now=now)  # past hold_s: a reference above, then down again
    assert max(seen) >= settled + 2 and limit.stats.cycles == 2


@pytest.mark.parametrize("bad, word", [(dict(max_limit=0), "max_limit"), (dict(max_limit=4, min_limit=5), "min_limit"),
                                       (dict(max_limit=4, tolerance=0.0), "tolerance"),
                                       (dict(max_limit=4, window_s=0.0), "window_s"),
                                       (dict(max_limit=4, per_step=0), "per_step")])
def test_a_bad_config_is_refused_naming_the_field(bad, word):
    with pytest.raises(ValueError, match=word):
        KneeConfig(**bad)


def test_a_stalled_server_changes_nothing():
    """Every slot working and nothing answered (hung calls, a stopped replica): no window counts,
    so the depth does not fall to the minimum while nothing is measured."""
    limit = KneeLimit(KneeConfig(max_limit=16))
    limit.observe(0.0, full=True)
    for t in np.arange(0.1, 30.0, 0.1):
        limit.observe(float(t), full=True)
    assert limit.limit == 16 and limit.stats.windows == 0
