"""The wire: the names a ranking caller, both servers and the load tests must agree on.

    SERVICE_NAME       recserve.v1.Ranker (protos/recserve/v1/ranker.proto), also the
                       grpc.health.v1 service name both servers answer for (besides "")
    PREDICT_METHOD     /recserve.v1.Ranker/Predict      (raw method paths, for callers that
    MODEL_INFO_METHOD  /recserve.v1.Ranker/ModelInfo     send pre-encoded bytes)
    TIMEOUT_METADATA   recserve-timeout-ms: the caller's deadline in milliseconds. Ray Serve's
                       gRPC proxy does not forward gRPC deadlines, so every recserve caller
                       sends this header too and both servers read it.

and the two functions both servers use at their edge: :func:`caller_timeout_s` (the one
deadline reader) and :func:`load_feature_filter` (the ``module:factory`` loader of
``AppArgs.feature_filter``).
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING

from serving.api.errors import InvalidRequest, quoted

if TYPE_CHECKING:
    import grpc

    from recserve.package import Manifest
    from serving.engine.routing import FeatureFilter

SERVICE_NAME = "recserve.v1.Ranker"
HEALTH_SERVICES = ("", SERVICE_NAME)  # the grpc.health.v1 names answered SERVING
PREDICT_METHOD = f"/{SERVICE_NAME}/Predict"
MODEL_INFO_METHOD = f"/{SERVICE_NAME}/ModelInfo"
TIMEOUT_METADATA = "recserve-timeout-ms"


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


def load_feature_filter(path: str | None, manifest: Manifest) -> FeatureFilter:
    """The feature filter that ``path`` ('module:factory', see ``AppArgs.feature_filter``)
    makes for ``manifest``: ``factory(manifest)``; the identity for None, "" or "none"."""
    from serving.engine.routing import identity_filter

    if path in (None, "", "none"):
        return identity_filter
    module, sep, factory = path.partition(":")
    if not sep or not module or not factory:
        raise ValueError(f"feature filter {path!r}: expected an import path 'module:factory'")
    return getattr(importlib.import_module(module), factory)(manifest)
