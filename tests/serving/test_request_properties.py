"""Property: any request that parses gets, over real gRPC from the monolith, either OK with
the torchrec reference's scores, or INVALID_ARGUMENT / NOT_FOUND: never INTERNAL, UNKNOWN,
another code or a non-finite score. Requests are drawn around valid ones (hypothesis), with
every field sometimes wrong: batch size, dense width and values (NaN, inf, beyond the
bound), unknown and missing features, lengths, ids, weights, unit ids, model, version."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recserve.batch import Bags, Batch
from recserve.package import ModelPackage
from recserve.v1 import ranker_pb2
from serving.api.client import RankingClient
from serving.api.codec import MAX_ABS_DENSE
from serving.standalone.monolith import MonolithThread

LAYOUT = "load-2"  # row-split tables: ids go to two shards
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def server(tiny_packages, helpers):
    package = tiny_packages(LAYOUT)
    with MonolithThread(package, max_batch_size=helpers.max_batch) as srv, \
            RankingClient(f"127.0.0.1:{srv.port}") as client:
        yield client, ModelPackage.open(package).manifest


def _sometimes(draw, p_wrong: float) -> bool:
    """True with about ``p_wrong``; shrinks to False (towards a valid request)."""
    return draw(st.integers(0, 999)) >= 1000 * (1 - p_wrong)


ODD_FLOATS = st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -3.4e38, MAX_ABS_DENSE, -MAX_ABS_DENSE,
                              np.nextafter(np.float32(MAX_ABS_DENSE), np.float32(np.inf)), 0.0, -0.0, 1e-45])
NAMES = st.text(max_size=100) | st.just("x" * 5000)


@st.composite
def requests(draw, tiny, max_batch: int, version: str):
    B = draw(st.integers(1, 6) | st.integers(0, max_batch + 2))
    F = tiny.dense_features
    n_dense = B * F if not _sometimes(draw, 0.05) else max(B * F + draw(st.sampled_from([-1, 1])), 0)
    dense = draw(st.lists(st.floats(-8, 8, width=32) | ODD_FLOATS if _sometimes(draw, 0.15)
                          else st.floats(-8, 8, width=32), min_size=n_dense, max_size=n_dense))
    req = ranker_pb2.PredictRequest(batch_size=B, request_id=draw(st.text(max_size=20)))
    req.dense.extend(dense)
    rows = {f: t.rows for t in tiny.tables for f in t.features}
    for feature in tiny.features:
        if _sometimes(draw, 0.1):  # missing: empty bags
            continue
        n_len = B if not _sometimes(draw, 0.05) else draw(st.integers(0, B + 2))
        lengths = draw(st.lists(st.integers(0, 4) if not _sometimes(draw, 0.05) else st.integers(-3, 4),
                                min_size=n_len, max_size=n_len))
        n = max(sum(lengths), 0) + (0 if not _sometimes(draw, 0.05) else draw(st.sampled_from([-1, 1])))
        ids = st.integers(0, rows[feature] - 1)
        if _sometimes(draw, 0.05):
            ids = ids | st.sampled_from([-1, rows[feature], 2**62, -(2**63)])
        values = draw(st.lists(ids, min_size=max(n, 0), max_size=max(n, 0)))
        bags = req.sparse[feature]
        bags.values.extend(values)
        bags.lengths.extend(lengths)
        if _sometimes(draw, 0.3):
            n_w = len(values) if not _sometimes(draw, 0.1) else len(values) + 1
            bags.weights.extend(draw(st.lists(st.floats(0.125, 2, width=32) | (ODD_FLOATS if _sometimes(draw, 0.1)
                                                                             else st.nothing()),
                                              min_size=n_w, max_size=n_w)))
    if _sometimes(draw, 0.05):
        req.sparse[draw(NAMES)].lengths.extend([0] * B)
    if _sometimes(draw, 0.2):
        n_units = B if not _sometimes(draw, 0.2) else B + 1
        req.unit_ids.extend(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n_units, max_size=n_units)))
    req.model = draw(st.sampled_from(["", "tiny"]) | NAMES) if _sometimes(draw, 0.1) else ""
    req.version = draw(st.sampled_from(["", version]) | NAMES) if _sometimes(draw, 0.1) else ""
    return req


def as_batch(req, F: int) -> Batch:
    """The batch a valid request means (absent features stay absent: empty bags)."""
    B = req.batch_size
    sparse = {name: Bags(np.asarray(f.values, np.int64), np.asarray(f.lengths, np.int32),
                         np.asarray(f.weights, np.float32) if len(f.weights) else None)
              for name, f in req.sparse.items()}
    return Batch(np.asarray(req.dense, np.float32).reshape(B, F), sparse)


def test_any_parseable_request_is_scored_correctly_or_refused_with_its_code(server, reference, tiny, helpers):
    client, manifest = server
    seen: dict[str, int] = {}

    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests(tiny, helpers.max_batch, manifest.version))
    def check(req):
        assert ranker_pb2.PredictRequest.FromString(req.SerializeToString()) == req  # it parses
        try:
            resp = client.predict_raw(req, timeout=30)
        except grpc.RpcError as e:
            assert e.code() in ALLOWED, (e.code(), e.details()[:300])
            assert len(e.details()) < 1000, "messages quote caller strings only briefly"
            seen[e.code().name] = seen.get(e.code().name, 0) + 1
            return
        seen["OK"] = seen.get("OK", 0) + 1
        scores = np.asarray(resp.scores, np.float32)
        assert resp.version == manifest.version and resp.model == manifest.name
        assert np.isfinite(scores).all() and scores.shape == (req.batch_size,)
        batch = as_batch(req, tiny.dense_features)
        # at |x| near the bound, float32 rounding in the logit moves saturated scores a little more
        atol = 1e-5 if np.abs(batch.dense).max(initial=0) <= 8 else 1e-3
        np.testing.assert_allclose(scores, reference(batch), rtol=0, atol=atol)

    check()
    print(f"outcomes: {seen}")
    assert seen.get("OK", 0) >= 5 and seen.get("INVALID_ARGUMENT", 0) >= 5, seen  # both sides were explored
