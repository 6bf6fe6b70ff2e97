"""RankingClient: numpy in, scores out, over the Ranker gRPC API (Serve app or monolith).

    with RankingClient("127.0.0.1:9000") as client:
        scores = client.predict(dense, {"user_id": (values, lengths), ...}, timeout=0.5)

Errors raise ``grpc.RpcError`` carrying the server's code and message (``e.code()``,
``e.details()``).

Needs only grpcio, protobuf and numpy (no torch, Ray or pydantic: tests/serving/test_client.py
ranks from an interpreter where those fail to import). The files a caller copies:
serving/api/{client,wire,codec,errors}.py (and the empty
serving/__init__.py, serving/api/__init__.py), recserve/batch.py and the generated recserve/v1/.
"""

from __future__ import annotations

import uuid

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.v1 import ranker_pb2, ranker_pb2_grpc
from serving.api.wire import SERVICE_NAME, timeout_metadata
from serving.api.codec import encode_request


class RankingClient:
    def __init__(self, address: str, *, application: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        """``address`` is host:port; ``application`` picks a Serve app when several are deployed;
        ``credentials`` (``grpc.ssl_channel_credentials(...)``) for a TLS front (serving/standalone/tls_front.py)."""
        self.address = address
        options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
        self.channel = (grpc.secure_channel(address, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(address, options=options))
        self.stub = ranker_pb2_grpc.RankerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._metadata = (("application", application),) if application else ()

    def _call_args(self, timeout: float | None) -> dict:
        metadata = list(self._metadata)
        if timeout is not None:
            metadata.append(timeout_metadata(timeout))
        return {"timeout": timeout, "metadata": metadata}

    def predict(
        self,
        dense: np.ndarray,  # float32 [B, F]
        sparse: dict,  # name -> (values int64 [N], lengths int32 [B]) or (values, lengths, weights float32 [N])
        *,
        model: str | None = None,
        version: str | None = None,
        unit_ids: np.ndarray | None = None,  # [B]
        timeout: float | None = None,  # seconds
        request_id: str | None = None,
    ) -> np.ndarray:
        """Scores float32 [B] in request order."""
        request = encode_request(
            dense, sparse, model=model or "", version=version or "", unit_ids=unit_ids,
            request_id=request_id or uuid.uuid4().hex,
        )
        return np.asarray(self.predict_raw(request, timeout=timeout).scores, dtype=np.float32)

    def predict_raw(self, request: ranker_pb2.PredictRequest, *, timeout: float | None = None) -> ranker_pb2.PredictResponse:
        """Send a prepared PredictRequest (the load test and the bad-input tests use this)."""
        return self.stub.Predict(request, **self._call_args(timeout))

    def model_info(self, model: str | None = None, *, timeout: float | None = 10.0) -> ranker_pb2.ModelInfoResponse:
        return self.stub.ModelInfo(ranker_pb2.ModelInfoRequest(model=model or ""), **self._call_args(timeout))

    def health_check(self, service: str = SERVICE_NAME, *, timeout: float | None = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... from the standard grpc.health.v1 service."""
        resp = self.health.Check(health_pb2.HealthCheckRequest(service=service), **self._call_args(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, model: str, version: str | None = None, *, timeout: float = 60.0) -> None:
        """Block until ModelInfo answers with ``model`` (and ``version``): after a deploy, Serve's
        proxy may still route to the previous application for a moment."""
        import time

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                info = self.model_info(timeout=5.0)
                if info.model == model and (version is None or info.version == version):
                    return
                last = f"answered by {info.model} {info.version}"
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(0.2)
        raise TimeoutError(f"{self.address}: {model} {version or ''} not serving after {timeout}s ({last})")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
