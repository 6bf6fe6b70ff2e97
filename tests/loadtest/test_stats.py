import math

import numpy as np
import pytest

from loadtest.driver import RunRecord, _Recorder, arrival_offsets, arrival_times
from loadtest.stats import error_counts, fill_cpu_overhead, percentiles_ms, summarize
from loadtest.trace import Fanout


def _run(latencies_s, codes, *, rate=10.0, wall=1.0) -> RunRecord:
    n = len(codes)
    lat = np.asarray(latencies_s, float)
    return RunRecord(
        mode="open", offered_rps=rate, concurrency=None, wall_s=wall,
        scheduled_s=np.arange(n) / rate, latency_s=lat, service_s=lat * 0.9, codes=tuple(codes),
        trace_index=np.arange(n) % 3, request_bytes=np.full(n, 100), response_bytes=np.full(n, 20),
    )  # fmt: skip


def test_open_loop_arrivals_stay_within_the_duration_and_the_request_cap():
    t = arrival_offsets(100.0, 2.0, 10_000, arrivals="poisson", seed=0)
    assert t[0] == 0 and (np.diff(t) >= 0).all() and t[-1] < 2.0
    assert 150 < len(t) < 250  # ~ rate x duration
    assert len(arrival_offsets(100.0, 2.0, 17)) == 17
    u = arrival_offsets(10.0, 1.0, 100, arrivals="uniform")
    np.testing.assert_allclose(u, np.arange(10) / 10.0)


def test_arrivals_are_reproducible_by_seed():
    a = arrival_offsets(50.0, 1.0, 1000, seed=5)
    np.testing.assert_array_equal(a, arrival_offsets(50.0, 1.0, 1000, seed=5))


def test_arrivals_are_drawn_as_sent_whatever_the_chunk():
    """An open loop that another thread ends (an hour's duration, no real cap) holds only what
    it sent: the times are drawn a chunk at a time, the same times whatever the chunk."""
    import itertools

    for arrivals in ("poisson", "uniform"):
        whole = list(arrival_times(50.0, 3.0, 1000, arrivals=arrivals, seed=2))
        chunked = list(arrival_times(50.0, 3.0, 1000, arrivals=arrivals, seed=2, chunk=7))
        assert len(chunked) == len(whole) > 100
        np.testing.assert_allclose(chunked, whole, rtol=1e-12)  # sums in another order
        np.testing.assert_allclose(whole, arrival_offsets(50.0, 3.0, 1000, arrivals=arrivals, seed=2))
    # 10^12 requests over 30,000 years: the first five cost five
    first = list(itertools.islice(arrival_times(1000.0, 1e12, 10**12, arrivals="uniform"), 5))
    np.testing.assert_allclose(first, np.arange(5) / 1000.0)


def test_the_recorder_grows_past_its_first_size_and_keeps_every_row():
    rec = _Recorder(2, keep_responses=True)
    for slot in range(5000):
        rec.grow(slot)
        rec.scheduled[slot], rec.codes[slot], rec.responses[slot] = slot, "OK", b"x"
        rec.count = slot + 1
    run = rec.record(mode="open", rate=1.0, concurrency=None, wall_s=1.0)
    assert len(run) == 5000 and set(run.codes) == {"OK"} and len(run.responses) == 5000
    np.testing.assert_array_equal(run.scheduled_s, np.arange(5000))


@pytest.mark.parametrize("bad", [dict(rate=0), dict(duration_s=-1), dict(max_requests=0), dict(arrivals="burst")])
def test_bad_arrival_options_are_refused_by_name(bad):
    kw = dict(rate=10.0, duration_s=1.0, max_requests=10) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        arrival_offsets(kw["rate"], kw["duration_s"], kw["max_requests"], arrivals=kw.get("arrivals", "poisson"))


def test_percentiles_are_in_milliseconds_and_ignore_unanswered_requests():
    p50, p99 = percentiles_ms(np.array([0.001] * 98 + [0.1, np.nan]), (50, 99))
    assert p50 == pytest.approx(1.0)
    assert 1.0 < p99 <= 100.0
    assert all(math.isnan(x) for x in percentiles_ms(np.array([])))


def test_summary_counts_errors_by_code_and_uses_only_ok_latencies():
    codes = ["OK"] * 8 + ["DEADLINE_EXCEEDED", "UNAVAILABLE"]
    lat = [0.010] * 8 + [5.0, 0.001]
    fan = Fanout(shard_calls=np.array([1, 2, 3]), internal_bytes=np.array([10, 20, 30]))
    s = summarize("table-2", _run(lat, codes, wall=2.0), fanout=fan, cpu_s=0.08)
    assert (s.sent, s.ok) == (10, 8)
    assert s.errors == "DEADLINE_EXCEEDED:1;UNAVAILABLE:1"
    assert s.p99_ms == pytest.approx(10.0)
    assert s.throughput_rps == pytest.approx(4.0)
    assert s.cpu_ms_per_req == pytest.approx(10.0)
    assert math.isnan(s.examples_per_s)  # no examples per trace request given
    # examples of the OK answers only: trace requests 0,1,2,0,1,2,0,1 of 100/200/300 examples
    with_examples = summarize("table-2", _run(lat, codes, wall=2.0), examples=np.array([100, 200, 300]))
    assert with_examples.examples_per_s == pytest.approx((3 * 100 + 3 * 200 + 2 * 300) / 2.0)
    idx = np.arange(10) % 3
    assert s.shard_calls_per_req == pytest.approx(np.array([1, 2, 3])[idx].mean())
    assert error_counts(("OK", "OK")) == {}


def test_cpu_overhead_is_relative_to_the_monolith_at_the_same_rate():
    mono = summarize("monolith", _run([0.01] * 10, ["OK"] * 10, rate=10), cpu_s=0.1)
    other_rate = summarize("monolith", _run([0.01] * 10, ["OK"] * 10, rate=20), cpu_s=0.5)
    sharded = summarize("table-2", _run([0.01] * 10, ["OK"] * 10, rate=10), cpu_s=0.25)
    fill_cpu_overhead([mono, other_rate, sharded])
    assert mono.cpu_overhead == pytest.approx(1.0)
    assert sharded.cpu_overhead == pytest.approx(2.5)
