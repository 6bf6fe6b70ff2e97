"""FadingClient: the FadingControl API from Python (what ``recserve fade`` uses).

    with FadingClient("127.0.0.1:50061", token="s3cret") as fc:
        fc.start("criteo-kaggle", "cat_2", Schedule.parse("1,0.75,0.5,0.25,0", "10m"))
        print(fc.status("criteo-kaggle"))

Errors raise ``grpc.RpcError`` with the server's code and message.
"""

from __future__ import annotations

import os

import grpc

from recserve.v1 import fading_pb2, fading_pb2_grpc
from serving.fading.proto import steps_to_proto, thresholds_to_proto
from serving.fading.schedule import Schedule, Thresholds

ENV_ADDR = "RECSERVE_FADE_ADDR"
DEFAULT_ADDR = "127.0.0.1:50061"


def default_addr() -> str:
    return os.environ.get(ENV_ADDR) or DEFAULT_ADDR


class FadingClient:
    def __init__(self, address: str | None = None, *, token: str | None = None, timeout_s: float = 10.0):
        self.address = address or default_addr()
        self.channel = grpc.insecure_channel(self.address)
        self.stub = fading_pb2_grpc.FadingControlStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def _call(self, method: str, request):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout_s)

    def start(
        self,
        model: str,
        feature: str,
        schedule: Schedule,
        *,
        thresholds: Thresholds | None = None,
        control_fraction: float | None = None,
        salt: str | None = None,
        reason: str = "",
    ) -> fading_pb2.FeatureFadeStatus:
        req = fading_pb2.StartScheduleRequest(
            model=model,
            feature=feature,
            steps=steps_to_proto(schedule),
            thresholds=thresholds_to_proto(thresholds or Thresholds()),
            reason=reason,
        )
        if control_fraction is not None:
            req.control_fraction = control_fraction
        if salt is not None:
            req.salt = salt
        return self._call("StartSchedule", req)

    def pause(self, model: str, feature: str, reason: str = "") -> fading_pb2.FeatureFadeStatus:
        return self._call("Pause", fading_pb2.FeatureRequest(model=model, feature=feature, reason=reason))

    def resume(self, model: str, feature: str, reason: str = "") -> fading_pb2.FeatureFadeStatus:
        return self._call("Resume", fading_pb2.FeatureRequest(model=model, feature=feature, reason=reason))

    def rollback(self, model: str, feature: str, reason: str = "") -> fading_pb2.FeatureFadeStatus:
        return self._call("Rollback", fading_pb2.FeatureRequest(model=model, feature=feature, reason=reason))

    def set_coverage(self, model: str, feature: str, coverage: float, reason: str = "") -> fading_pb2.FeatureFadeStatus:
        req = fading_pb2.SetCoverageRequest(model=model, feature=feature, coverage=coverage, reason=reason)
        return self._call("SetCoverage", req)

    def status(self, model: str = "", feature: str = "") -> fading_pb2.StatusResponse:
        return self._call("Status", fading_pb2.StatusRequest(model=model, feature=feature))

    def audit(self, model: str = "", limit: int = 100) -> fading_pb2.AuditResponse:
        return self._call("Audit", fading_pb2.AuditRequest(model=model, limit=limit))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FadingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
