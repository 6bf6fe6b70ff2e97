"""Senders that replay a trace at a server over gRPC and record every request.

- :func:`open_loop`: requests leave at fixed offered-rate arrival times (Poisson or evenly
  spaced), whether or not earlier ones have answered, so a slow server cannot slow the
  offered load down. Latency is measured from the *scheduled* send time (no coordinated
  omission): if the sender itself falls behind, that delay counts.
- :func:`closed_loop`: ``concurrency`` workers each send the next request as soon as their
  previous one answers: the maximum throughput the server sustains.

Both are bounded by a duration and a request count, and every request carries a deadline;
the payloads are pre-serialized ``PredictRequest`` bytes, sent through a raw
(bytes-in, bytes-out) method so the client spends no time encoding or decoding.
Traffic goes to the address given; the bench only ever passes 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import grpc
import numpy as np

from serving.api.wire import PREDICT_METHOD, timeout_metadata

Arrivals = Literal["poisson", "uniform"]

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
# connections a run spreads its requests over (round robin), as a fleet of callers would: with
# --ingress shared the kernel balances Router replicas per connection, so one connection would
# reach one router whatever their number
CONNECTIONS = 8


class _Connections:
    """``n`` channels to one address, each its own connection (a subchannel pool of its own)."""

    def __init__(self, address: str, n: int = CONNECTIONS):
        options = _CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(n)]
        self.calls = [ch.unary_unary(PREDICT_METHOD) for ch in self.channels]

    async def __aenter__(self) -> list:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in self.channels)), 30.0)
        return self.calls

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels))


@dataclass(frozen=True)
class RunRecord:
    """Every request of one run, in send order."""

    mode: str  # "open" or "closed"
    offered_rps: float | None  # open loop: the offered rate
    concurrency: int | None  # closed loop: number of workers
    wall_s: float  # from the first scheduled send to the last answer
    scheduled_s: np.ndarray  # float64 [n] scheduled send time, seconds since the run began
    latency_s: np.ndarray  # float64 [n] answer time - scheduled send time
    service_s: np.ndarray  # float64 [n] answer time - actual send time
    codes: tuple[str, ...]  # [n] "OK" or the gRPC status code name
    trace_index: np.ndarray  # int64 [n] which trace request was sent
    request_bytes: np.ndarray  # int64 [n]
    response_bytes: np.ndarray  # int64 [n] (0 on error)
    responses: tuple[bytes | None, ...] = ()  # [n] serialized PredictResponse (None on error); kept on request

    def __len__(self) -> int:
        return len(self.codes)


def arrival_times(
    rate: float, duration_s: float, max_requests: int, *, arrivals: Arrivals = "poisson", seed: int = 0,
    chunk: int = 4096,
) -> Iterator[float]:
    """Send times (s from start) at ``rate`` per second within ``duration_s``, at most
    ``max_requests``, drawn ``chunk`` at a time: a run that another thread ends (an hour's
    ``duration_s``) holds only what it has sent."""
    if rate <= 0:
        raise ValueError(f"rate: must be positive, got {rate}")
    if duration_s <= 0:
        raise ValueError(f"duration_s: must be positive, got {duration_s}")
    if max_requests <= 0:
        raise ValueError(f"max_requests: must be positive, got {max_requests}")
    if arrivals not in ("poisson", "uniform"):
        raise ValueError(f"arrivals: must be 'poisson' or 'uniform', got {arrivals!r}")
    rng = np.random.default_rng(seed)
    sent, first, last = 0, None, 0.0
    while sent < max_requests:
        if arrivals == "uniform":
            t = (sent + np.arange(chunk, dtype=np.float64)) / rate
        else:
            t = last + np.cumsum(rng.exponential(1.0 / rate, chunk))
            last = float(t[-1])
            first = float(t[0]) if first is None else first
            t = t - first  # the first request leaves at once
        for x in t[: max_requests - sent]:
            if x >= duration_s:
                return
            yield float(x)
            sent += 1


def arrival_offsets(
    rate: float, duration_s: float, max_requests: int, *, arrivals: Arrivals = "poisson", seed: int = 0
) -> np.ndarray:
    """:func:`arrival_times` as one array: [n]."""
    return np.fromiter(arrival_times(rate, duration_s, max_requests, arrivals=arrivals, seed=seed), np.float64)


def _deadline(timeout_s: float) -> tuple[tuple[str, str], ...]:
    return (timeout_metadata(timeout_s),)


class _Recorder:
    """One row per request; ``grow`` makes room as a run goes on (an open loop that another
    thread ends allocates only what it sends)."""

    def __init__(self, n: int, *, keep_responses: bool = False) -> None:
        self.scheduled = np.zeros(n)
        self.latency = np.full(n, np.nan)
        self.service = np.full(n, np.nan)
        self.codes = ["UNSENT"] * n
        self.index = np.zeros(n, np.int64)
        self.req_bytes = np.zeros(n, np.int64)
        self.resp_bytes = np.zeros(n, np.int64)
        self.responses: list[bytes | None] | None = [None] * n if keep_responses else None
        self.count = 0

    def grow(self, slot: int) -> None:
        """Room for row ``slot`` (capacity doubled when it is past the end)."""
        n = len(self.codes)
        if slot < n:
            return
        more = max(n, slot + 1 - n, 1024)
        self.scheduled = np.concatenate([self.scheduled, np.zeros(more)])
        self.latency = np.concatenate([self.latency, np.full(more, np.nan)])
        self.service = np.concatenate([self.service, np.full(more, np.nan)])
        self.codes += ["UNSENT"] * more
        self.index = np.concatenate([self.index, np.zeros(more, np.int64)])
        self.req_bytes = np.concatenate([self.req_bytes, np.zeros(more, np.int64)])
        self.resp_bytes = np.concatenate([self.resp_bytes, np.zeros(more, np.int64)])
        if self.responses is not None:
            self.responses += [None] * more

    async def send(self, call, slot: int, k: int, payload: bytes, scheduled: float, t0: float, timeout_s: float) -> None:
        start = time.perf_counter()
        self.scheduled[slot] = scheduled - t0
        self.index[slot] = k
        self.req_bytes[slot] = len(payload)
        try:
            resp = await call(payload, timeout=timeout_s, metadata=_deadline(timeout_s))
            code, nbytes = "OK", len(resp)
            if self.responses is not None:
                self.responses[slot] = resp
        except grpc.aio.AioRpcError as e:
            code, nbytes = e.code().name, 0
        end = time.perf_counter()
        self.latency[slot] = end - scheduled
        self.service[slot] = end - start
        self.codes[slot] = code
        self.resp_bytes[slot] = nbytes

    def record(self, *, mode: str, rate: float | None, concurrency: int | None, wall_s: float) -> RunRecord:
        n = self.count
        return RunRecord(
            mode=mode,
            offered_rps=rate,
            concurrency=concurrency,
            wall_s=wall_s,
            scheduled_s=self.scheduled[:n].copy(),
            latency_s=self.latency[:n].copy(),
            service_s=self.service[:n].copy(),
            codes=tuple(self.codes[:n]),
            trace_index=self.index[:n].copy(),
            request_bytes=self.req_bytes[:n].copy(),
            response_bytes=self.resp_bytes[:n].copy(),
            responses=tuple(self.responses[:n]) if self.responses is not None else (),
        )


async def wait_ready(address: str, timeout_s: float = 60.0) -> None:
    """Wait until a gRPC channel to ``address`` connects (raises TimeoutError)."""
    async with grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS) as ch:
        await asyncio.wait_for(ch.channel_ready(), timeout_s)


async def warm_up(address: str, payloads: Sequence[bytes], n: int, *, timeout_s: float = 30.0) -> list[str]:
    """Send ``n`` requests one by one (not recorded); returns their status codes."""
    codes = []
    async with grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS) as ch:
        call = ch.unary_unary(PREDICT_METHOD)
        for i in range(n):
            try:
                await call(payloads[i % len(payloads)], timeout=timeout_s, metadata=_deadline(timeout_s))
                codes.append("OK")
            except grpc.aio.AioRpcError as e:
                codes.append(e.code().name)
    return codes


async def open_loop(
    address: str,
    payloads: Sequence[bytes],
    *,
    rate: float,
    duration_s: float,
    max_requests: int = 100_000,
    timeout_s: float = 5.0,
    arrivals: Arrivals = "poisson",
    seed: int = 0,
    start_index: int = 0,
    keep_responses: bool = False,
    until: Callable[[], bool] | None = None,
) -> RunRecord:
    """Send trace requests (cycling from ``start_index``) at ``rate``/s for ``duration_s``
    (``keep_responses``: the OK answers' bytes in the record, to check their scores).

    ``until``: also stop sending as soon as it returns True (checked before each request; a
    run whose end another thread decides, ``duration_s`` then its longest); the requests
    already sent are answered and recorded."""
    offsets = arrival_times(rate, duration_s, max_requests, arrivals=arrivals, seed=seed)
    rec = _Recorder(min(max_requests, int(rate * duration_s) + 1, 4096), keep_responses=keep_responses)
    async with _Connections(address) as calls:
        tasks: set[asyncio.Task] = set()  # those in flight
        errors: list[BaseException] = []  # anything but a gRPC status (those are recorded)

        def done(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                errors.append(task.exception())

        t0 = time.perf_counter() + 0.01
        for slot, off in enumerate(offsets):
            due = t0 + off
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if until is not None and until():
                break
            k = (start_index + slot) % len(payloads)
            rec.grow(slot)
            rec.count = slot + 1
            call = calls[slot % len(calls)]
            task = asyncio.create_task(rec.send(call, slot, k, payloads[k], due, t0, timeout_s))
            tasks.add(task)
            task.add_done_callback(done)
        await asyncio.gather(*tasks)
        if errors:
            raise errors[0]
        wall = time.perf_counter() - t0
    return rec.record(mode="open", rate=rate, concurrency=None, wall_s=wall)


async def closed_loop(
    address: str,
    payloads: Sequence[bytes],
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int = 100_000,
    timeout_s: float = 5.0,
    start_index: int = 0,
) -> RunRecord:
    """``concurrency`` workers send back to back for ``duration_s`` (at most ``max_requests``)."""
    if concurrency <= 0:
        raise ValueError(f"concurrency: must be positive, got {concurrency}")
    if duration_s <= 0 or max_requests <= 0:
        raise ValueError("duration_s and max_requests: must be positive")
    rec = _Recorder(max_requests)
    async with _Connections(address) as calls:
        t0 = time.perf_counter()
        end = t0 + duration_s

        async def worker(call) -> None:
            while time.perf_counter() < end and rec.count < max_requests:
                slot = rec.count
                rec.count += 1
                k = (start_index + slot) % len(payloads)
                await rec.send(call, slot, k, payloads[k], time.perf_counter(), t0, timeout_s)

        await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return rec.record(mode="closed", rate=None, concurrency=concurrency, wall_s=wall)
