"""Bad input is rejected at the edge with a typed error naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.package import ModelPackage
from serving.codec import ModelSpec, decode_request, encode_request
from serving.errors import Code, ServingError


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
