"""The Ray-free coalescer (serving/engine/coalesce.py): when batches go, what each request gets back."""

import asyncio
import time

import numpy as np
import pytest

from recserve.batch import Bags, Batch
from serving.engine.coalesce import Coalescer, concat_batches


class Gate:
    """A run function that records its batches and, while ``hold`` is set, waits to be released."""

    def __init__(self, bad=()):
        self.batches: list[list] = []
        self.release = asyncio.Event()
        self.hold = False
        self.bad = set(bad)

    async def first_in_flight(self, c: Coalescer, item=1):
        """Hold the gate and send ``item``: a batch in flight that the next requests queue behind."""
        self.hold = True
        first = asyncio.ensure_future(c.submit(item, size=1))
        await asyncio.sleep(0.01)
        return first

    def open(self):
        self.hold = False
        self.release.set()

    async def __call__(self, items):
        self.batches.append(list(items))
        if self.hold:
            await self.release.wait()
        if self.bad & {x for x in items if not isinstance(x, tuple)}:
            raise ValueError(f"bad item among {items}")
        return [x * 10 if not isinstance(x, tuple) else x[1] * 10 for x in items]


def run(coro):
    return asyncio.run(coro)


def test_an_idle_coalescer_sends_at_once_and_a_burst_behind_a_batch_goes_together():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=100)
        first = await gate.first_in_flight(c)
        assert gate.batches == [[1]]  # nothing in flight: went at once, nobody waited for it
        rest = [asyncio.ensure_future(c.submit(x, size=1)) for x in (2, 3, 4)]
        await asyncio.sleep(0.05)
        assert gate.batches == [[1]]  # held while the first batch is in flight (no timer)
        gate.open()
        assert await asyncio.gather(first, *rest) == [10, 20, 30, 40]
        assert gate.batches == [[1], [2, 3, 4]]  # one batch when the first returned

    run(main())


def test_a_pipeline_of_two_sends_a_second_batch_while_the_first_is_in_flight_and_holds_the_third():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=100, pipeline=2)
        first = await gate.first_in_flight(c)
        second = asyncio.ensure_future(c.submit(2, size=1))
        await asyncio.sleep(0.01)
        assert gate.batches == [[1], [2]]  # one in flight: the next still went at once
        rest = [asyncio.ensure_future(c.submit(x, size=1)) for x in (3, 4)]
        await asyncio.sleep(0.05)
        assert gate.batches == [[1], [2]]  # two in flight: held
        gate.open()
        assert await asyncio.gather(first, second, *rest) == [10, 20, 30, 40]
        assert gate.batches == [[1], [2], [3, 4]]
        with pytest.raises(ValueError, match="pipeline"):
            Coalescer(gate, max_examples=1, pipeline=0)

    run(main())


def test_the_example_cap_splits_batches_and_a_larger_request_runs_alone():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=10)
        first = await gate.first_in_flight(c, 0)
        sizes = {1: 4, 2: 4, 3: 4, 4: 25, 5: 2}
        rest = [asyncio.ensure_future(c.submit(x, size=n)) for x, n in sizes.items()]
        await asyncio.sleep(0.01)
        gate.open()
        assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
        for b in gate.batches[1:]:
            assert sum(sizes[x] for x in b) <= 10 or b == [4]
        assert [4] in gate.batches and sorted(x for b in gate.batches for x in b) == [0, 1, 2, 3, 4, 5]

    run(main())


def test_keys_never_mix_in_a_batch():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=100)
        gate.hold = True
        calls = [asyncio.ensure_future(c.submit((v, x), size=1, key=v)) for x in range(6) for v in ("v1", "v2")]
        await asyncio.sleep(0.01)
        gate.open()
        assert await asyncio.gather(*calls) == [x * 10 for x in range(6) for _ in ("v1", "v2")]
        assert all(len({v for v, _ in b}) == 1 for b in gate.batches), gate.batches
        assert len(gate.batches) == 4  # per version: the first alone, then the rest together

    run(main())


def test_one_bad_request_fails_alone():
    async def main():
        gate = Gate(bad={3})
        c = Coalescer(gate, max_examples=100)
        first = await gate.first_in_flight(c)
        rest = [asyncio.ensure_future(c.submit(x, size=1)) for x in (2, 3, 4)]
        await asyncio.sleep(0.01)
        gate.open()
        got = await asyncio.gather(first, *rest, return_exceptions=True)
        assert got[:2] == [10, 20] and got[3] == 40
        assert isinstance(got[2], ValueError)
        assert [2, 3, 4] in gate.batches and [3] in gate.batches  # the batch failed, then one by one

    run(main())


def test_a_request_that_expires_fails_alone_and_is_never_sent():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=100)
        first = await gate.first_in_flight(c)
        # the first batch's latency is not known yet: the short-deadline request can wait
        short = asyncio.ensure_future(c.submit(2, size=1, deadline=time.monotonic() + 0.05,
                                               expired=lambda: TimeoutError("two ran out")))
        patient = asyncio.ensure_future(c.submit(3, size=1, deadline=time.monotonic() + 30))
        with pytest.raises(TimeoutError, match="two ran out"):
            await short
        gate.open()
        assert await asyncio.gather(first, patient) == [10, 30]
        assert gate.batches == [[1], [3]]

    run(main())


def test_a_request_that_expires_in_a_sent_batch_does_not_fail_its_mates():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=100, max_wait_s=0.01, fixed_wait=True)  # both in one batch
        gate.hold = True
        short = asyncio.ensure_future(c.submit(1, size=1, deadline=time.monotonic() + 0.1))
        mate = asyncio.ensure_future(c.submit(2, size=1, deadline=time.monotonic() + 30))
        with pytest.raises(TimeoutError):
            await short
        assert gate.batches == [[1, 2]]
        gate.release.set()
        assert await mate == 20

    run(main())


def test_a_request_that_cannot_wait_is_not_held():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=100)
        gate.hold = True
        first = asyncio.ensure_future(c.submit(1, size=1))
        await asyncio.sleep(0.2)
        gate.release.set()
        await first  # the batch latency is now ~0.2 s
        gate.release.clear()
        second = asyncio.ensure_future(c.submit(2, size=1))
        await asyncio.sleep(0.01)
        urgent = asyncio.ensure_future(c.submit(3, size=1, deadline=time.monotonic() + 0.3))
        await asyncio.sleep(0.01)
        assert gate.batches == [[1], [2], [3]]  # sent beside the batch in flight, not held
        gate.release.set()
        assert await asyncio.gather(second, urgent) == [20, 30]

    run(main())


def test_the_wait_bound_sends_a_batch_while_another_is_in_flight():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=100, max_wait_s=0.02)
        first = await gate.first_in_flight(c)
        second = asyncio.ensure_future(c.submit(2, size=1))
        await asyncio.sleep(0.1)
        assert gate.batches == [[1], [2]]  # the bound passed: sent though [1] is still in flight
        gate.release.set()
        assert await asyncio.gather(first, second) == [10, 20]

    run(main())


def test_fixed_wait_holds_even_an_idle_batch():
    async def main():
        gate = Gate()
        c = Coalescer(gate, max_examples=100, max_wait_s=0.05, fixed_wait=True)
        calls = [asyncio.ensure_future(c.submit(x, size=1)) for x in (1, 2)]
        await asyncio.sleep(0.01)
        assert gate.batches == []
        assert await asyncio.gather(*calls) == [10, 20]
        assert gate.batches == [[1, 2]]

    run(main())


def _batch(seed: int, b: int, features: dict[str, bool]) -> Batch:
    rng = np.random.default_rng(seed)
    sparse = {}
    for name, weighted in features.items():
        lengths = rng.integers(0, 3, b).astype(np.int32)
        values = rng.integers(0, 100, int(lengths.sum())).astype(np.int64)
        sparse[name] = Bags(values, lengths, rng.random(values.size).astype(np.float32) if weighted else None)
    return Batch(rng.standard_normal((b, 4)).astype(np.float32), sparse)


def test_concatenated_batches_slice_back_into_the_requests():
    parts = [_batch(0, 3, {"a": False, "b": True}), _batch(1, 2, {"a": False}), _batch(2, 4, {"b": False, "c": False})]
    merged = concat_batches(parts)
    row = 0
    for p in parts:
        got = merged.slice(row, row + p.batch_size)
        row += p.batch_size
        np.testing.assert_array_equal(got.dense, p.dense)
        for name, bags in got.sparse.items():
            want = p.sparse.get(name) or Bags.empty(p.batch_size)
            np.testing.assert_array_equal(bags.lengths, want.lengths)
            np.testing.assert_array_equal(bags.values, want.values)
            if bags.weights is not None:
                np.testing.assert_array_equal(bags.weights, want.weights if want.weights is not None
                                              else np.ones(want.values.size, np.float32))
    assert merged.batch_size == 9 and set(merged.sparse) == {"a", "b", "c"}



class Timed:
    """A run function that takes ``seconds`` a batch, whatever its size, and records its batches."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.batches: list[list] = []

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        return [x * 10 for x in items]


async def _slow_batch_ahead(c: Coalescer, timed: Timed, learned: int, ahead_s: float):
    """``learned`` batches of ``timed.seconds`` one after the other (what a batch takes here),
    then one of ``ahead_s`` in flight, which the next requests wait for."""
    for i in range(learned):
        await c.submit(100 + i, size=1)
    fast, timed.seconds = timed.seconds, ahead_s
    first = asyncio.ensure_future(c.submit(1, size=1))
    await asyncio.sleep(0.01)
    timed.seconds = fast
    return first


def test_a_request_with_less_time_left_than_a_batch_takes_is_refused_when_its_batch_goes_and_its_mates_run():
    async def main():
        timed = Timed(0.1)
        c = Coalescer(timed, max_examples=100)
        first = await _slow_batch_ahead(c, timed, 4, 0.3)  # a batch takes ~0.1 s; this one 0.3 s
        assert 0.09 <= c.batch_time() < 0.5
        late = asyncio.ensure_future(c.submit(2, size=1, deadline=time.monotonic() + 0.34,  # may wait: > 2 batches
                                              shed=lambda left, took: RuntimeError(f"shed {left:.2f} {took:.2f}")))
        patient = asyncio.ensure_future(c.submit(3, size=1, deadline=time.monotonic() + 30))
        assert await first == 10
        # when [1] returned, [2] had ~0.04 s left, less than a batch: refused at once, not run
        with pytest.raises(RuntimeError, match=r"shed 0\.0\d 0\.1"):
            await late
        assert await patient == 30
        assert timed.batches[-2:] == [[1], [3]]
        assert c.shed == 1

    run(main())


def test_the_last_late_request_still_goes_alone_and_nothing_is_shed_before_batch_times_are_known():
    async def main():
        timed = Timed(0.1)
        c = Coalescer(timed, max_examples=100)
        first = await _slow_batch_ahead(c, timed, 2, 0.2)  # 3 batch times when it returns: not enough
        soon = [asyncio.ensure_future(c.submit(x, size=1, deadline=time.monotonic() + 0.25,
                                               shed=lambda left, took: RuntimeError("shed")))
                for x in (2, 3)]
        assert await first == 10
        for late in soon:  # too late for a batch, but no estimate yet: sent, and then expired
            with pytest.raises(TimeoutError):
                await late
        assert timed.batches[-1] == [2, 3] and c.shed == 0
        await asyncio.sleep(0.1)  # their batch returns: a fourth batch time
        assert c.batch_time() is not None
        first = await _slow_batch_ahead(c, timed, 0, 0.3)
        a = asyncio.ensure_future(c.submit(4, size=1, deadline=time.monotonic() + 0.32))
        b = asyncio.ensure_future(c.submit(5, size=1, deadline=time.monotonic() + 0.35))
        await first
        # both have less than a batch left: the one with the most time goes alone, the other is refused
        with pytest.raises(TimeoutError):
            await a
        await asyncio.wait([b])  # answered or expired: it ran
        assert timed.batches[-1] == [5] and c.shed == 1

    run(main())
