"""The wire: the names a ranking caller, both servers and the load tests must agree on.

    SERVICE_NAME       recserve.v1.Ranker (protos/recserve/v1/ranker.proto), also the
                       grpc.health.v1 service name both servers answer for (besides "")
    PREDICT_METHOD     /recserve.v1.Ranker/Predict      (raw method paths, for callers that
    MODEL_INFO_METHOD  /recserve.v1.Ranker/ModelInfo     send pre-encoded bytes)
    TIMEOUT_METADATA   recserve-timeout-ms: the caller's deadline in milliseconds. Ray Serve's
                       gRPC proxy does not forward gRPC deadlines, so every recserve caller
                       sends this header too and both servers read it.
    GRPC_SERVICERS     the servicer functions Serve's gRPC proxy registers (import paths)

and the one deadline reader both servers use at their edge, :func:`caller_timeout_s`, and the
one registration of their Ranker servicer, :func:`add_ranker_servicer`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from serving.api.errors import InvalidRequest, quoted

if TYPE_CHECKING:
    from collections.abc import Callable

    import grpc

SERVICE_NAME = "recserve.v1.Ranker"
HEALTH_SERVICES = ("", SERVICE_NAME)  # the grpc.health.v1 names answered SERVING
PREDICT_METHOD = f"/{SERVICE_NAME}/Predict"
MODEL_INFO_METHOD = f"/{SERVICE_NAME}/ModelInfo"
TIMEOUT_METADATA = "recserve-timeout-ms"
# The gRPC deadline as it stood when the request reached the server (wall clock, seconds), kept
# on Ray Serve's gRPC context (serving/app/deployments.py), which drops the deadline: the
# header above counts from when the handler starts, after any wait in the server's queues.
ARRIVAL_DEADLINE_ATTR = "_recserve_deadline_unix"
# the servicers Serve's gRPC proxy registers (grpc_options.grpc_servicer_functions; deploy/*.yaml)
GRPC_SERVICERS = [
    "recserve.v1.ranker_pb2_grpc.add_RankerServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def timeout_metadata(timeout_s: float) -> tuple[str, str]:
    """The (key, value) metadata pair that carries a deadline of ``timeout_s`` seconds."""
    return (TIMEOUT_METADATA, str(int(timeout_s * 1000)))


def caller_timeout_s(context: grpc.ServicerContext | None, default: float | None = None) -> float | None:
    """Seconds the caller allows this call: the smaller of its gRPC deadline (where the
    context has one: plain grpc servers, not Serve's proxy) and its ``recserve-timeout-ms``
    header; ``default`` when it sent neither (or there is no context), capped by
    ``default`` when given.

    A header that is not a finite number raises InvalidRequest naming the header.
    """
    if context is None:
        return default
    left = context.time_remaining() if hasattr(context, "time_remaining") else None
    arrived_deadline = getattr(context, ARRIVAL_DEADLINE_ATTR, None)  # Serve's context (direct ingress)
    if left is None and arrived_deadline is not None:
        left = arrived_deadline - time.time()
    for key, value in context.invocation_metadata() or ():
        if key == TIMEOUT_METADATA:
            try:
                ms = float(value)
            except ValueError:
                ms = math.nan
            if not math.isfinite(ms):
                raise InvalidRequest(TIMEOUT_METADATA, f"{quoted(value)} is not a number of milliseconds")
            left = ms / 1000.0 if left is None else min(left, ms / 1000.0)
    if left is None:
        return default
    return left if default is None else min(left, default)


def add_ranker_servicer(servicer, server: grpc.aio.Server, observe: Callable[[str, float], None] | None = None) -> None:
    """The generated ``add_RankerServicer_to_server``, with each Predict request's protobuf parse
    timed as the stage ``parse`` (ms) when ``observe`` is given: gRPC parses a request before its
    handler runs, so none of the handler's laps sees it (0.9 ms for a 214 KB dlrmv2 request here,
    as much as the handler's own ``decode``)."""
    import grpc

    from recserve.v1 import ranker_pb2

    parse_request = ranker_pb2.PredictRequest.FromString

    def timed_parse(data: bytes) -> ranker_pb2.PredictRequest:
        start = time.perf_counter()
        try:
            return parse_request(data)
        finally:
            observe("parse", (time.perf_counter() - start) * 1000)

    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(
            servicer.Predict, request_deserializer=parse_request if observe is None else timed_parse,
            response_serializer=ranker_pb2.PredictResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo, request_deserializer=ranker_pb2.ModelInfoRequest.FromString,
            response_serializer=ranker_pb2.ModelInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def behind_door(door, handler):
    """``handler(request, context)`` behind a server's ``door`` (serving/engine/door.py's Door: its
    ``through(left_s, call)``): a call the door refuses is answered RESOURCE_EXHAUSTED with the
    door's reason before the handler runs; the caller's deadline (gRPC's) decides whether it may wait."""
    import grpc

    from serving.api.errors import DoorRefused

    async def guarded(request, context):
        try:
            return await door.through(context.time_remaining(), lambda: handler(request, context))
        except DoorRefused as refused:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(refused))

    return guarded
