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
under overload a refused request costs the router almost nothing and learns it at once.

Balancing is per connection: one caller's channel reaches one router. A client that wants
more than one router's throughput opens several connections (a fleet of callers does; so does
``recserve bench``'s driver).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import grpc

Handler = Callable[[Any, Any], Awaitable[Any]]

# requests beyond the door's slots (max_in_flight + max_queued) that health checks and
# ModelInfo may still use: a probe is not refused because Predict calls fill the door
_CONTROL_SLACK = 8


class _Door:
    """Predict's slots: ``max_in_flight`` at once, ``max_queued`` more wait for one, the rest
    are refused (gRPC's core refuses most of them before this; the control slack ends here)."""

    def __init__(self, max_in_flight: int, max_queued: int):
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_queued = max_queued
        self.waiting = 0

    def guard(self, handler: Handler) -> Handler:
        async def guarded(request, context):
            if self._slots.locked() and self.waiting >= self._max_queued:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"overloaded: {self._max_queued} requests already wait for this router")
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
            try:
                return await handler(request, context)
            finally:
                self._slots.release()

        return guarded


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


def start_ingress(address: str, *, predict: Handler, model_info: Handler, check: Handler,
                  max_in_flight: int, max_queued: int, max_message_bytes: int = 256 << 20) -> grpc.aio.Server:
    """Bind ``address`` (HOST:PORT, shared with the other routers) and start serving on the
    running event loop; returns the server (``await server.stop(grace)`` to stop). Raises
    OSError naming the address when it cannot be bound (a server without SO_REUSEPORT holds it)."""
    from grpc_health.v1 import health_pb2_grpc
    from recserve.v1 import ranker_pb2_grpc

    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes)],
        maximum_concurrent_rpcs=max_in_flight + max_queued + _CONTROL_SLACK,
    )
    door = _Door(max_in_flight, max_queued)
    ranker_pb2_grpc.add_RankerServicer_to_server(_ranker_servicer(door.guard(predict), model_info), server)
    health_pb2_grpc.add_HealthServicer_to_server(_health_servicer(check), server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc's "Failed to bind"
        raise OSError(f"cannot bind {address} for the Router's gRPC: {e}") from e
    if bound == 0:
        raise OSError(f"cannot bind {address} for the Router's gRPC")
    asyncio.get_running_loop().create_task(server.start())
    return server
