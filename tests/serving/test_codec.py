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


def test_the_check_over_all_features_at_once_accepts_exactly_what_the_per_feature_check_accepts(spec, tiny):
    from recserve.synth import TrafficGenerator
    from serving.api.codec import _check_bags, _checked_at_once

    rng = np.random.default_rng(0)
    for seed in range(40):
        batch = TrafficGenerator(tiny, seed=seed, empty_bag_fraction=0.3).batch(int(rng.integers(1, 9)))
        B = batch.batch_size
        sparse = {f: [b.values.copy(), b.lengths.copy(), None] for f, b in batch.sparse.items()}
        f = list(sparse)[seed % len(sparse)]
        values, lengths, _ = sparse[f]
        defect = seed % 6
        if defect == 1 and values.size:
            values[rng.integers(values.size)] = spec.rows[f]  # one past the table
        elif defect == 2 and values.size:
            values[rng.integers(values.size)] = -1
        elif defect == 3:
            lengths[0] += 1  # lengths no longer sum to the ids
        elif defect == 4:
            sparse[f][1] = np.append(lengths, 0)  # B + 1 bags
        elif defect == 5:
            sparse[f][2] = np.ones(values.size, np.float32)  # weights: always the per-feature path
        try:
            want = {n: _check_bags(n, *sparse[n], B, spec.rows[n]) for n in sparse}
        except ServingError:
            want = None
        got = _checked_at_once(spec, B, {n: tuple(t) for n, t in sparse.items()})
        if want is None or defect == 5:
            assert got is None, (seed, defect)
            continue
        assert got is not None and set(got) == set(want), (seed, defect)
        for n, bags in got.items():
            np.testing.assert_array_equal(bags.values, want[n].values)
            np.testing.assert_array_equal(bags.lengths, want[n].lengths)
