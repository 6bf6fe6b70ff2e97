"""Batch buckets: which shapes are captured, and which bucket a request is padded to."""

from __future__ import annotations

import pytest

from serving.engine.buckets import Bucket, batch_buckets, id_buckets, pick, shard_buckets


def test_batch_buckets_are_powers_of_two_up_to_and_including_the_maximum():
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(700) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 700)
    assert batch_buckets(4096, (4096, 1024, 1024)) == (1024, 4096)
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_id_buckets_cover_the_expected_ids_of_every_batch_in_the_bucket():
    ids = id_buckets(64, 10.0, spread=2)  # batches 33..64 at 5..20 ids per example
    assert 33 * 5 <= ids[0] < 2 * 33 * 5 and ids[-1] >= 64 * 20  # the fewest ids padded at most 2x
    assert all(b == 2 * a for a, b in zip(ids, ids[1:]))


def test_a_request_gets_the_smallest_bucket_that_fits_and_none_above_all():
    buckets = shard_buckets(8, 3.0, spread=2)
    assert pick(buckets, 3, 5) == Bucket(4, 8)
    assert pick(buckets, 3, 40) == Bucket(8, 64)  # too many ids for batch 4: a larger batch bucket
    assert pick(buckets, 9, 1) is None  # above the largest batch: run eagerly
    assert pick(buckets, 8, 10_000) is None
