"""Adaptive coalescing of concurrent requests into one batched call (no Ray, no gRPC).

Used by the router (one split, one call per shard, one tower call for many requests), by the
monolith (one lookup pass and one tower call), and in place of ``@serve.batch`` by the shards
and the tower (several routers' batches merge there).

When a batch goes (per key; keys never mix in a batch, e.g. the model version)::

    submit, fewer than ``pipeline`` batches    -> at once (an idle stack adds no wait; pipeline
      of this key in flight                       2 lets the shards take the next batch while
                                                  the tower scores this one)
    a batch of this key returns                -> everything pending goes
    pending examples reach ``max_examples``    -> those go
    the oldest pending waited ``max_wait_s``   -> everything pending goes (None: no timer)
    a request arrives that cannot wait         -> everything pending goes with it

"Cannot wait": its deadline is nearer than the expected hold (the recent batch latency, at
most ``max_wait_s``) plus its own batch.

No work for a request that cannot be answered in time: when a batch goes, a request in it whose
deadline is nearer than a batch takes here (the median of the newest ``_LATENCY_WINDOW`` batch
times, once ``_LATENCY_MIN`` are known) is failed at once with ``shed(left_s, batch_s)``
instead of riding along, and its mates go without it. Under overload the queue ahead of a
request is this batch: without this, batches carried requests that expired before they
returned, and the work spent on them was the capacity that the requests still in time lacked
(four routers over one tower on 2 cores: batches of 660 ms for 1 s deadlines, 16-25 OK/s of a
capacity of ~110, benchmarks/results/door-4routers-2core). When every request of a batch is
that late, the one with the most time left still goes, alone: a batch of one is the fastest
there is, and its time corrects an estimate that was too long. ``fixed_wait`` (@serve.batch's way, for tests of
slow deployments): every batch waits ``max_wait_s`` for others, idle or not. A batch never exceeds ``max_examples`` except a single
request larger than that, which runs alone (never refused).

Each request waits for its own result until its own deadline: one that expires leaves alone
(``expired()`` raises for it), the batch goes on for its mates; an expired request still
pending is never sent. ``run(items)`` returns one result per item, where a result may be an
exception for that item alone; if it raises for a batch of several, the items are run one
by one (when ``isolate(error)``), so one bad request fails alone.

Example (a tower that scores dense rows)::

    c = Coalescer(run=lambda items: ..., max_examples=4096)
    scores = await c.submit(dense, size=len(dense), key="v1", deadline=time.monotonic() + 0.5)
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

import numpy as np

from recserve.batch import Bags, Batch
from serving.api.errors import Overloaded

T = TypeVar("T")
R = TypeVar("R")

# the time a batch takes here, for shedding: the median of this many newest batches, once this
# many are known (a few slow ones, a first call that compiles, do not shed anything)
_LATENCY_WINDOW = 16
_LATENCY_MIN = 4


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    size: int  # examples
    deadline: float | None  # time.monotonic()
    queued_at: float
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    shed: Callable[[float, float], BaseException] | None = None  # (left_s, batch_s) -> its error
    sent_at: float | None = None  # when its batch went
    batch_s: float = 0.0  # its batch's time, set when the batch returns
    batch_items: int = 0  # requests in its batch

    @property
    def left(self) -> bool:
        return self.future.done()

    @property
    def waited(self) -> Waited:
        return Waited(queued_s=self.sent_at - self.queued_at, batch_s=self.batch_s, batch_items=self.batch_items)


@dataclass(frozen=True)
class Waited:
    """What one request's trip through a coalescer took (seconds): before its batch went,
    and the batch's own time; ``batch_items`` requests shared the batch."""

    queued_s: float
    batch_s: float
    batch_items: int


def too_late(where: str) -> Callable[[float, float], Overloaded]:
    """A ``shed`` for :meth:`Coalescer.submit`: RESOURCE_EXHAUSTED (retry later or elsewhere),
    naming ``where`` the request waited and the times that did not fit."""
    def shed(left_s: float, batch_s: float) -> Overloaded:
        return Overloaded(f"overloaded: {where} takes ~{batch_s * 1000:.0f} ms a batch and "
                          f"{left_s * 1000:.0f} ms were left before the deadline")
    return shed


class _Key:
    """The pending requests and the batches in flight of one key."""

    def __init__(self) -> None:
        self.pending: deque[_Entry] = deque()
        self.pending_examples = 0
        self.in_flight = 0
        self.timer: asyncio.TimerHandle | None = None


class Coalescer(Generic[T, R]):
    """Merges concurrent ``submit`` calls into calls of ``run(items) -> results`` (see the module
    docstring). ``run`` is a coroutine function; one coalescer per event loop."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        *,
        max_examples: int,
        max_wait_s: float | None = None,
        isolate: Callable[[BaseException], bool] = lambda error: True,
        cancel_abandoned: bool = False,
        fixed_wait: bool = False,
        pipeline: int = 1,
    ):
        if max_examples <= 0:
            raise ValueError(f"max_examples: must be positive, got {max_examples}")
        if max_wait_s is not None and max_wait_s < 0:
            raise ValueError(f"max_wait_s: must be >= 0 or None, got {max_wait_s}")
        if fixed_wait and max_wait_s is None:
            raise ValueError("fixed_wait: needs a max_wait_s")
        if pipeline < 1:
            raise ValueError(f"pipeline: must be >= 1, got {pipeline}")
        self.run = run
        self.pipeline = pipeline  # batches of a key in flight before requests wait for one to return
        self.max_examples = max_examples
        self.max_wait_s = max_wait_s
        self.isolate = isolate
        self.cancel_abandoned = cancel_abandoned  # cancel a batch whose every request has left
        self.fixed_wait = fixed_wait  # every batch waits max_wait_s, idle or not (@serve.batch's way)
        self._keys: dict[Hashable, _Key] = {}
        self._latency_s = 0.0  # recent batch latency (EWMA), for "cannot wait"
        self._batch_times: deque[float] = deque(maxlen=_LATENCY_WINDOW)  # newest last, for shedding
        self.batches = 0  # calls of run (isolated reruns included)
        self.items = 0  # requests those calls carried
        self.shed = 0  # requests failed at once: their deadline was nearer than a batch's time

    def configure(self, *, max_examples: int, max_wait_s: float | None, fixed_wait: bool = False) -> None:
        """Change the cap and the bound at run time (Serve's reconfigure)."""
        if max_examples <= 0:
            raise ValueError(f"max_examples: must be positive, got {max_examples}")
        if fixed_wait and max_wait_s is None:
            raise ValueError("fixed_wait: needs a max_wait_s")
        self.max_examples, self.max_wait_s, self.fixed_wait = max_examples, max_wait_s, fixed_wait

    async def submit(
        self,
        item: T,
        *,
        size: int,
        key: Hashable = None,
        deadline: float | None = None,
        expired: Callable[[], BaseException] = TimeoutError,
        waited: list | None = None,
        shed: Callable[[float, float], BaseException] | None = None,
    ) -> R:
        """``item``'s result from a batch of ``key``; raises ``expired()`` once ``deadline``
        (time.monotonic()) passes, ``shed(left_s, batch_s)`` (default ``expired()``) when its
        batch goes with less time left than a batch takes, or the item's own error.
        ``waited``, when given, gets a :class:`Waited` appended."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise expired()
        entry = _Entry(item=item, size=int(size), deadline=deadline, queued_at=now,
                       future=asyncio.get_running_loop().create_future(), shed=shed or (lambda _l, _b: expired()))
        k = self._keys.setdefault(key, _Key())
        k.pending.append(entry)
        k.pending_examples += entry.size
        idle = k.in_flight < self.pipeline and not self.fixed_wait
        if idle or k.pending_examples >= self.max_examples or not self._can_wait(entry, now):
            self._flush(key, k)
        elif self.max_wait_s is not None and k.timer is None:
            k.timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._flush, key, k)
        try:
            if deadline is None:
                await asyncio.shield(entry.future)
            else:
                await asyncio.wait_for(asyncio.shield(entry.future), max(deadline - time.monotonic(), 0.0))
        except (TimeoutError, asyncio.CancelledError) as e:
            if not entry.future.done():
                entry.future.cancel()  # leaves: never sent if still pending, its batch goes on
            else:  # done between the timeout and here: take the result
                return self._result(entry, waited)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise expired() from None
        return self._result(entry, waited)

    def _result(self, entry: _Entry, waited: list | None) -> R:
        result = entry.future.result()
        if waited is not None and entry.sent_at is not None:
            waited.append(entry.waited)
        return result

    def _can_wait(self, entry: _Entry, now: float) -> bool:
        """Whether ``entry`` can be held for the batch in flight and still run in time: its
        deadline is further than the expected hold plus its own batch (recent latency)."""
        if entry.deadline is None or self.fixed_wait:
            return True
        hold = self._latency_s if self.max_wait_s is None else min(self._latency_s, self.max_wait_s)
        return entry.deadline - now > hold + self._latency_s

    def batch_time(self) -> float | None:
        """What a batch takes here: the median of the newest batches' times (seconds); None
        until ``_LATENCY_MIN`` are known."""
        if len(self._batch_times) < _LATENCY_MIN:
            return None
        return statistics.median_low(self._batch_times)

    def _without_late(self, batch: list[_Entry]) -> list[_Entry]:
        """``batch`` less the requests that cannot be answered in time by it (failed here at once);
        if that is all of them, the one with the most time left still goes, alone."""
        took = self.batch_time()
        if took is None:
            return batch
        now = time.monotonic()
        late = [e for e in batch if e.deadline is not None and e.deadline - now < took]
        if not late:
            return batch
        if len(late) == len(batch):
            late.remove(max(late, key=lambda e: e.deadline))
        for e in late:
            self.shed += 1
            e.future.set_exception(e.shed(max(e.deadline - now, 0.0), took))
        return [e for e in batch if not e.left]

    def _flush(self, key: Hashable, k: _Key) -> None:
        """Send everything pending of ``key``, in batches of at most ``max_examples``, without the
        requests too late for a batch."""
        if k.timer is not None:
            k.timer.cancel()
            k.timer = None
        while k.pending:
            batch, examples = [], 0
            while k.pending:
                e = k.pending[0]
                if e.left:  # expired or cancelled while pending: never sent
                    k.pending.popleft()
                    k.pending_examples -= e.size
                    continue
                if batch and examples + e.size > self.max_examples:
                    break
                k.pending.popleft()
                k.pending_examples -= e.size
                batch.append(e)
                examples += e.size
            batch = self._without_late(batch) if batch and not self.fixed_wait else batch
            if batch:
                k.in_flight += 1
                asyncio.ensure_future(self._send(key, k, batch))

    async def _send(self, key: Hashable, k: _Key, batch: list[_Entry]) -> None:
        started = time.monotonic()
        for e in batch:
            e.sent_at = started
        try:
            if not self.cancel_abandoned:
                await self._run(batch)
            else:
                task = asyncio.ensure_future(self._run(batch))
                watch = [e.future for e in batch]
                for f in watch:  # the last request to leave cancels the batch's work
                    f.add_done_callback(lambda _f: task.cancel() if all(w.done() for w in watch) else None)
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        finally:
            took = time.monotonic() - started
            self._latency_s = took if self._latency_s == 0 else 0.8 * self._latency_s + 0.2 * took
            self._batch_times.append(took)
            for e in batch:
                e.batch_s, e.batch_items = took, len(batch)
            k.in_flight -= 1
            if k.pending and not self.fixed_wait:
                self._flush(key, k)
            elif k.in_flight == 0 and k.timer is None and not k.pending:
                self._keys.pop(key, None)

    async def _run(self, batch: list[_Entry]) -> None:
        """Results (or errors) onto the entries' futures; a failed batch of several is rerun
        one request at a time, so that only the request that causes an error gets it."""
        live = [e for e in batch if not e.left]
        if not live:
            return
        self.batches += 1
        self.items += len(live)
        try:
            results = await self.run([e.item for e in live])
            if len(results) != len(live):
                raise RuntimeError(f"coalescer: run returned {len(results)} results for {len(live)} items")
        except Exception as error:  # noqa: BLE001  handed to the requests
            if len(live) > 1 and self.isolate(error):
                await asyncio.gather(*(self._run([e]) for e in live))
                return
            results = [error] * len(live)
        for e, r in zip(live, results):
            if e.future.done():
                continue
            if isinstance(r, BaseException):
                e.future.set_exception(r)
            else:
                e.future.set_result(r)


def concat_batches(batches: list[Batch]) -> Batch:
    """Batches stacked along the example axis, request after request.

    A feature absent from some batches gets empty bags for their examples; weights of 1 fill
    in for batches without weights where another has them; unit ids are kept only if every
    batch has them."""
    if len(batches) == 1:
        return batches[0]
    names = list(dict.fromkeys(name for b in batches for name in b.sparse))
    sparse = {}
    for name in names:
        bags = [b.sparse.get(name) or Bags.empty(b.batch_size) for b in batches]
        weighted = any(x.weights is not None for x in bags)
        sparse[name] = Bags(
            values=np.concatenate([x.values for x in bags]),
            lengths=np.concatenate([x.lengths for x in bags]),
            weights=np.concatenate([x.weights if x.weights is not None else np.ones(x.values.size, np.float32)
                                    for x in bags]) if weighted else None,
        )
    units = None
    if all(b.unit_ids is not None for b in batches):
        units = np.concatenate([b.unit_ids for b in batches])
    return Batch(np.concatenate([b.dense for b in batches]), sparse, units)


def split_rows(values: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """``values`` [sum sizes, ...] cut into consecutive parts of ``sizes`` rows."""
    return np.split(values, np.cumsum(sizes)[:-1])
