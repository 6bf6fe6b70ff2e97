"""serving/api/wire.py, the wire: its names match the generated gRPC code, the deadline header
is read (and a malformed one rejected by name) by a real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from recserve.synth import TrafficGenerator
from recserve.v1 import ranker_pb2
from serving.api import wire as api
from serving.api.client import RankingClient
from serving.api.codec import encode_request
from serving.standalone.monolith import MonolithThread


def test_service_name_and_method_paths_are_those_of_the_generated_code():
    service = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"]
    assert api.SERVICE_NAME == service.full_name
    assert api.PREDICT_METHOD == f"/{service.full_name}/{service.methods_by_name['Predict'].name}"
    assert api.MODEL_INFO_METHOD == f"/{service.full_name}/{service.methods_by_name['ModelInfo'].name}"
    assert api.timeout_metadata(0.25) == (api.TIMEOUT_METADATA, "250")


def test_the_deadline_header_is_read_and_a_malformed_one_is_invalid_argument_naming_it(tiny_packages, tiny, helpers):
    batch = TrafficGenerator(tiny, seed=3).batch(4)
    request = encode_request(batch.dense, helpers.as_sparse(batch))
    with MonolithThread(tiny_packages("table-2")) as srv, RankingClient(f"127.0.0.1:{srv.port}") as client:
        for value in ("soon", "nan", "inf"):
            with pytest.raises(grpc.RpcError) as err:
                client.stub.Predict(request, metadata=[(api.TIMEOUT_METADATA, value)], timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, value
            assert api.TIMEOUT_METADATA in err.value.details(), err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # an expired budget: nothing is scored
            client.stub.Predict(request, metadata=[(api.TIMEOUT_METADATA, "0")], timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        scores = client.stub.Predict(request, metadata=[api.timeout_metadata(30)], timeout=30).scores
        assert len(scores) == 4 and np.isfinite(scores).all()
