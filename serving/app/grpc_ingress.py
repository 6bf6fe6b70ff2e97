"""A Router replica's own gRPC server on the stack's one address (``--ingress shared``).

Every Router replica binds the same ``HOST:PORT`` with ``SO_REUSEPORT``; the kernel spreads the
callers' connections over them (by a hash of each connection's addresses), so one address
serves any number of routers, on all the node's cores, with no proxy in between. Serve's own
direct ingress hands each ingress replica a port of its own (and turns SO_REUSEPORT off), so
several routers behind one address needed Serve's proxy, which parses and re-pickles every
request.

The server is plain ``grpc.aio`` on the replica's event loop: the Router's methods are the
handlers, with gRPC's own context (its deadline included). Its door: at most ``max_in_flight``
Predict calls work at once, ``max_queued`` more wait for a slot, and beyond both gRPC's core
answers RESOURCE_EXHAUSTED before this process parses the request (``maximum_concurrent_rpcs``):
no handler runs for a refused request, but grpc.aio still takes each arrival through the event
loop (a few hundred microseconds), so past ~1,000 arrivals/s on one core the refusals themselves
queue (benchmarks/results/overload-pinned). A call that would wait but could not be answered
before its deadline is refused at once too.

Balancing is per connection: one caller's channel reaches one router. A client that wants
more than one router's throughput opens several connections (a fleet of callers does; so does
``recserve bench``'s driver).

Serve does not see these requests, so its default autoscaling policy (requests in flight on
its handles and proxies) would count none: :meth:`Ingress.load` is the mean number of Predict
calls in the door, which the Router reports to Serve (serving/app/autoscaling.py's InFlightPolicy).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from typing import Any, Awaitable, Callable

import grpc

from serving.api.wire import add_ranker_servicer
from serving.engine.concurrency import KneeConfig, KneeLimit, may_wait
from serving.engine.occupancy import TimeAverage

Handler = Callable[[Any, Any], Awaitable[Any]]

# requests beyond the door's slots (max_in_flight + max_queued) that health checks and
# ModelInfo may still use: a probe is not refused because Predict calls fill the door
_CONTROL_SLACK = 8
# a call's time in a slot: the median of the newest _SERVED_WINDOW, once _SERVED_MIN are known
_SERVED_WINDOW = 32
_SERVED_MIN = 4


class _Door:
    """Predict's slots: ``max_in_flight`` at once, ``max_queued`` more wait for one, the rest
    are refused (gRPC's core refuses most of them before this; the control slack ends here).

    ``adaptive``: the number of slots follows the knee of the router's throughput
    (serving/engine/concurrency.py), up to ``max_in_flight``, and a quarter as many (at least
    one, at most ``max_queued``) may wait: under overload an admitted call waits behind no more
    calls than the throughput needs, and the others are refused at once.

    A call that would have to wait is also refused at once when it cannot be answered before its
    deadline: the queue ahead of it (``waiting + 1`` calls over the slots) and its own time in a
    slot, each slot's time the median of the newest calls', exceed the time it has left. Without
    this it waited in the queue and was then shed by the router's admission (or expired): told
    late, at the cost of a queue place."""

    def __init__(self, max_in_flight: int, max_queued: int, adaptive: bool | KneeConfig = False,
                 on_depth: Callable[[int], None] | None = None):
        self._max_in_flight = max_in_flight
        self._max_queued = max_queued
        self._on_depth = on_depth
        if adaptive is True:
            adaptive = KneeConfig(max_limit=max_in_flight)
        self.adaptive = KneeLimit(adaptive) if adaptive else None
        self._told = self.depth()  # the depth last given to on_depth
        self._served: deque[float] = deque(maxlen=_SERVED_WINDOW)  # seconds in a slot, newest last
        self._queue: deque[asyncio.Future] = deque()  # calls waiting for a slot, oldest first
        self.working = 0
        self._in_door = TimeAverage()  # calls working and waiting

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def slots(self) -> int:
        """How many calls may work at once now."""
        return self.adaptive.limit if self.adaptive is not None else self._max_in_flight

    def may_wait(self) -> int:
        """How many calls may wait for a slot now."""
        return may_wait(self.slots(), self._max_queued, adaptive=self.adaptive is not None)

    def depth(self) -> int:
        """Calls this door takes now, working and waiting."""
        return self.slots() + self.may_wait()

    def load(self) -> float:
        """The mean number of Predict calls in the door (working and waiting) since the last
        call of this method (or since the door opened); adapting, scaled to ``max_in_flight`` as
        the door's depth (a door full at a limit of 8 of 32 reports 32), so that an autoscaler
        that aims at half of ``max_in_flight`` sees a full door as one."""
        mean = self._in_door.mean()
        return mean * self._max_in_flight / self.slots() if self.adaptive is not None else mean

    def _changed(self) -> None:
        """After a call took or left a slot: the adaptive limit hears whether the door is full, and
        the front its new depth."""
        if self.adaptive is None:
            return
        self.adaptive.observe(time.monotonic(), full=self.working >= self.slots())
        if self._on_depth is not None and self.depth() != self._told:
            self._told = self.depth()
            self._on_depth(self._told)

    def too_late(self, left_s: float | None) -> str | None:
        """Why a call with ``left_s`` seconds to its deadline cannot wait its turn, or None."""
        if left_s is None or len(self._served) < _SERVED_MIN:
            return None
        slot = statistics.median(self._served)
        wait = (self.waiting + 1) * slot / self.slots()
        if wait + slot <= left_s:
            return None
        return (f"overloaded: ~{wait * 1000:.0f} ms of queue ahead and ~{slot * 1000:.0f} ms to answer "
                f"exceed the {left_s * 1000:.0f} ms left before the deadline")

    def _refusal(self, left_s: float | None) -> str | None:
        """Why a call that finds every slot taken is refused, or None (it waits)."""
        if self.waiting >= self.may_wait():
            if self.adaptive is not None:
                return (f"overloaded: this router works on {self.working} requests, the depth at which its "
                        f"throughput levels off now (of at most {self._max_in_flight}), and {self.waiting} wait; "
                        f"retry later")
            return f"overloaded: {self._max_queued} requests already wait for this router"
        return self.too_late(left_s)

    def _release(self) -> None:
        self.working -= 1
        while self._queue and self.working < self.slots():
            turn = self._queue.popleft()
            if not turn.done():
                self.working += 1
                turn.set_result(None)
        self._changed()

    async def _enter(self, left_s: float | None, context) -> None:
        """Take a slot (waiting for one if need be). Aborts the call with RESOURCE_EXHAUSTED
        when it is refused."""
        if self.working < self.slots() and not self._queue:
            self.working += 1
            self._changed()
            return
        why = self._refusal(left_s)
        if why:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot was given as the call was cancelled: pass it on
            else:
                self._queue.remove(turn)
            raise

    def guard(self, handler: Handler) -> Handler:
        async def guarded(request, context):
            self._in_door.add(1)
            try:
                await self._enter(context.time_remaining(), context)
                started = time.monotonic()
                try:
                    return await handler(request, context)
                finally:
                    answered = time.monotonic()
                    self._served.append(answered - started)
                    if self.adaptive is not None:
                        self.adaptive.completed(answered)
                    self._release()
            finally:
                self._in_door.add(-1)

        return guarded


class Ingress:
    """A started ingress: its gRPC server and its door."""

    def __init__(self, server: grpc.aio.Server, door: _Door, starting: asyncio.Task):
        self.server = server
        self._door = door
        self._starting = starting

    def load(self) -> float:
        """Mean Predict calls in the door (working + waiting) since the previous call."""
        return self._door.load()

    def depth(self) -> int:
        """Calls the door takes now, working and waiting."""
        return self._door.depth()

    async def stop(self, grace: float | None) -> None:
        """Take no new calls; those in flight get ``grace`` seconds (None: cancelled at once)."""
        # a grpc.aio server stopped before its start has run crashes the process (grpcio 1.85)
        await asyncio.gather(self._starting, return_exceptions=True)
        await self.server.stop(grace)


def _ranker_servicer(predict: Handler, model_info: Handler):
    from recserve.v1 import ranker_pb2_grpc

    class Ranker(ranker_pb2_grpc.RankerServicer):
        async def Predict(self, request, context):
            return await predict(request, context)

        async def ModelInfo(self, request, context):
            return await model_info(request, context)

    return Ranker()


def _health_servicer(check: Handler):
    from grpc_health.v1 import health_pb2_grpc

    class Health(health_pb2_grpc.HealthServicer):
        async def Check(self, request, context):
            return await check(request, context)

    return Health()


def start_ingress(address: str | list[str], *, predict: Handler, model_info: Handler, check: Handler,
                  max_in_flight: int, max_queued: int, max_message_bytes: int = 256 << 20,
                  observe: Callable[[str, float], None] | None = None,
                  adaptive: bool | KneeConfig = False,
                  on_depth: Callable[[int, int], None] | None = None) -> Ingress:
    """Bind ``address`` (HOST:PORT, shared with the other routers) and start serving on the
    running event loop; returns the :class:`Ingress` (``await ingress.stop(grace)`` to stop). Raises
    OSError naming the address when it cannot be bound (a server without SO_REUSEPORT holds it).

    A list of addresses instead: this replica takes the first one nobody holds (no SO_REUSEPORT),
    so each router has one of its own (serving.config.own_addresses); OSError naming them all when every
    one is taken. ``observe(stage, ms)`` gets each Predict request's protobuf parse as ``parse``.
    ``adaptive``: the door's slots adapt up to ``max_in_flight`` (see :class:`_Door`; a
    KneeConfig: with those settings), and
    ``on_depth(i, calls)`` hears, at start and at each change, how many calls (working and waiting)
    the door of the replica on the i-th of the addresses takes (a front refuses past it)."""
    from grpc_health.v1 import health_pb2_grpc

    candidates = [address] if isinstance(address, str) else list(address)
    door = _Door(max_in_flight, max_queued, adaptive)
    failures = []
    for candidate in candidates:
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", int(isinstance(address, str))),
                     ("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes)],
            maximum_concurrent_rpcs=max_in_flight + max_queued + _CONTROL_SLACK,
        )
        add_ranker_servicer(_ranker_servicer(door.guard(predict), model_info), server, observe)
        health_pb2_grpc.add_HealthServicer_to_server(_health_servicer(check), server)
        why = "taken"
        try:
            bound = server.add_insecure_port(candidate)
        except RuntimeError as e:  # grpc's "Failed to bind"
            bound, why = 0, str(e)
        if bound:
            if on_depth is not None:
                line = candidates.index(candidate)
                door._on_depth = lambda calls: on_depth(line, calls)
                on_depth(line, door.depth())
            return Ingress(server, door, asyncio.get_running_loop().create_task(server.start()))
        failures.append(candidate)
    raise OSError(f"cannot bind the Router's gRPC on {', '.join(failures)}: {why}")
