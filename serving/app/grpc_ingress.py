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
from typing import Any, Awaitable, Callable

import grpc

from serving.api.wire import add_ranker_servicer, behind_door
from serving.engine.concurrency import KneeConfig
from serving.engine.door import Door

Handler = Callable[[Any, Any], Awaitable[Any]]

# requests beyond the door's slots (max_in_flight + max_queued) that health checks and
# ModelInfo may still use: a probe is not refused because Predict calls fill the door
_CONTROL_SLACK = 8
class Ingress:
    """A started ingress: its gRPC server and its door."""

    def __init__(self, server: grpc.aio.Server, door: Door, starting: asyncio.Task):
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
    ``adaptive``: the door's slots adapt up to ``max_in_flight`` (see serving/engine/door.py; a
    KneeConfig: with those settings), and
    ``on_depth(i, calls)`` hears, at start and at each change, how many calls (working and waiting)
    the door of the replica on the i-th of the addresses takes (a front refuses past it)."""
    from grpc_health.v1 import health_pb2_grpc

    candidates = [address] if isinstance(address, str) else list(address)
    door = Door(max_in_flight, max_queued, adaptive)
    failures = []
    for candidate in candidates:
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", int(isinstance(address, str))),
                     ("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes)],
            maximum_concurrent_rpcs=max_in_flight + max_queued + _CONTROL_SLACK,
        )
        add_ranker_servicer(_ranker_servicer(behind_door(door, predict), model_info), server, observe)
        health_pb2_grpc.add_HealthServicer_to_server(_health_servicer(check), server)
        why = "taken"
        try:
            bound = server.add_insecure_port(candidate)
        except RuntimeError as e:  # grpc's "Failed to bind"
            bound, why = 0, str(e)
        if bound:
            if on_depth is not None:
                line = candidates.index(candidate)
                door.on_depth = lambda calls: on_depth(line, calls)
                on_depth(line, door.depth())
            return Ingress(server, door, asyncio.get_running_loop().create_task(server.start()))
        failures.append(candidate)
    raise OSError(f"cannot bind the Router's gRPC on {', '.join(failures)}: {why}")
