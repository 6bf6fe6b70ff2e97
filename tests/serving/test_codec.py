"""Bad input is rejected at the edge with a typed error naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.package import ModelPackage
from serving.api.codec import ModelSpec, decode_request, encode_request
from serving.api.errors import Code, ServingError


@pytest.fixture(scope="module")
def spec(tiny_packages, helpers):
    return ModelSpec.of(ModelPackage.open(tiny_packages("singular-1")).manifest, max_batch_size=helpers.max_batch)


def test_every_bad_input_gets_its_code_and_names_the_field(spec, tiny, helpers):
    for case, request, code, text in helpers.bad_requests(tiny):
        with pytest.raises(ServingError) as err:
            decode_request(request, spec)
        assert err.value.code == Code[code], case
        assert text in err.value.message, (case, err.value.message)


def test_a_good_request_round_trips(spec, tiny):
    from recserve.synth import TrafficGenerator

    batch = TrafficGenerator(tiny, seed=3, empty_bag_fraction=0.5).batch(5)
    got = decode_request(encode_request(batch.dense, {f: (b.values, b.lengths) for f, b in batch.sparse.items()},
                                        unit_ids=batch.unit_ids), spec)
    np.testing.assert_array_equal(got.dense, batch.dense)
    np.testing.assert_array_equal(got.unit_ids, batch.unit_ids)
    for f, b in batch.sparse.items():
        np.testing.assert_array_equal(got.sparse[f].values, b.values)
        np.testing.assert_array_equal(got.sparse[f].lengths, b.lengths)


def test_a_missing_feature_is_looked_up_as_empty_bags(spec, tiny):
    from recserve.synth import TrafficGenerator

    batch = TrafficGenerator(tiny, seed=4).batch(3)
    sparse = {f: (b.values, b.lengths) for f, b in batch.sparse.items() if f != "category"}
    got = decode_request(encode_request(batch.dense, sparse), spec)
    assert "category" not in got.sparse  # absent: no lookup, a zero pooled embedding (ranker.proto)
    assert set(got.sparse) == set(tiny.features) - {"category"}


def test_error_messages_quote_caller_strings_only_briefly(spec, tiny, helpers):
    for case, request, _, _ in helpers.bad_requests(tiny):
        with pytest.raises(ServingError) as err:
            decode_request(request, spec)
        assert len(err.value.message) < 400, (case, len(err.value.message))


def test_non_finite_scores_are_never_encoded():
    from serving.api.codec import encode_response
    from serving.api.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="example 1"):
        encode_response(np.array([0.5, np.nan, 0.2], np.float32), model="tiny", version="v")
    assert list(encode_response(np.array([0.5], np.float32), model="tiny", version="v").scores) == [0.5]
