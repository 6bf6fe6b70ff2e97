"""ShardCore's bucketed request path on the CPU: padding a request to its bucket, the
device-side id check and the output dtype never change what a lookup returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import IndexOutOfRangeError
from recserve.package import ModelPackage
from recserve.synth import TrafficGenerator
from serving.engine.pooled import to_torch
from serving.engine.routing import Routing, ShardRequest
from serving.engine.shard import ShardCore
from tests.serving.conftest import with_weights


@pytest.fixture(scope="module")
def package(tiny_packages):
    return ModelPackage.open(tiny_packages("singular-1"))


def _requests(tiny, package, sizes, *, weighted=False):
    routing = Routing(package.manifest)
    gen = TrafficGenerator(tiny, seed=3, empty_bag_fraction=0.2)
    out = []
    for B in sizes:
        batch = gen.batch(B)
        out.append(routing.split(with_weights(batch) if weighted else batch)[0])
    return out


@pytest.mark.parametrize("path", ["kernel", "fused"])
@pytest.mark.parametrize("weighted", [False, True])
def test_padded_lookups_equal_unpadded_ones(tiny, package, path, weighted):
    plain = ShardCore(package, 0, lookup_path=path)
    padded = ShardCore(package, 0, pad=True, max_batch_size=8, lookup_path=path)
    assert padded.buckets and max(b.batch for b in padded.buckets) == 8
    # 13 is above every bucket (eager); 8 then 1 reuse buffers holding a larger request's ids
    for r in _requests(tiny, package, (1, 3, 8, 13, 8, 1, 5), weighted=weighted):
        np.testing.assert_allclose(padded.lookup(r), plain.lookup(r), rtol=1e-6, atol=1e-6)


def test_the_fused_lookup_equals_the_kernels_reference(tiny, package):
    fused = ShardCore(package, 0, lookup_path="fused")
    kernel = ShardCore(package, 0, lookup_path="kernel", backend="reference")
    for r in _requests(tiny, package, (1, 7, 33)):
        np.testing.assert_allclose(fused.lookup(r), kernel.lookup(r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_output_is_the_float32_output_rounded_once(tiny, package, dtype):
    full = ShardCore(package, 0, pad=True, max_batch_size=8)
    half = ShardCore(package, 0, pad=True, max_batch_size=8, output_dtype=dtype)
    for r in _requests(tiny, package, (2, 8, 11)):
        got = half.lookup(r)
        assert got.dtype == (np.float16 if dtype == torch.float16 else np.uint16)
        assert got.nbytes * 2 == full.lookup(r).nbytes
        assert torch.equal(to_torch(got), torch.from_numpy(full.lookup(r)).to(dtype))


@pytest.mark.parametrize("pad", [False, True])
def test_an_id_outside_the_slice_raises_the_typed_error_and_the_core_stays_usable(tiny, package, pad):
    core = ShardCore(package, 0, pad=pad, max_batch_size=8)
    good = _requests(tiny, package, (4,))[0]
    values = good.values.copy()
    p = int(good.lengths[0].sum())  # the first id of column 1
    values[p] = core.columns[1].row_end  # one past the slice
    with pytest.raises(IndexOutOfRangeError) as err:
        core.lookup(ShardRequest(lengths=good.lengths, values=values))
    assert (err.value.table, err.value.position, err.value.index) == (1, p, core.columns[1].row_end)
    np.testing.assert_array_equal(core.lookup(good), ShardCore(package, 0).lookup(good))


def test_lengths_that_do_not_match_the_ids_are_rejected(tiny, package):
    core = ShardCore(package, 0)
    good = _requests(tiny, package, (3,))[0]
    with pytest.raises(ValueError, match="lengths"):
        core.lookup(ShardRequest(lengths=good.lengths, values=good.values[:-1]))


@pytest.mark.parametrize("pad", [False, True])
def test_a_lookup_left_on_the_device_equals_the_host_lookup_and_flags_bad_ids(tiny, package, pad):
    core = ShardCore(package, 0, pad=pad, max_batch_size=8)
    for r in _requests(tiny, package, (3, 8, 13)):
        pooled, flag = core.lookup_device(r)
        np.testing.assert_array_equal(pooled.numpy(), core.lookup(r))
        core.check_ids(r, flag)  # no bad id: no error
    good = _requests(tiny, package, (2,))[0]
    values = good.values.copy()
    values[-1] = -5
    bad = ShardRequest(lengths=good.lengths, values=values)
    _, flag = core.lookup_device(bad)
    with pytest.raises(IndexOutOfRangeError):
        core.check_ids(bad, flag)


def test_stale_ids_past_the_last_offset_never_reach_the_last_bag(tiny, package):
    """CUDA's embedding_bag ends the last bag at len(input): the fused path must not let the
    padding ids of a bucket land there (the last column's last bag is empty here)."""
    core = ShardCore(package, 0, pad=True, max_batch_size=8, lookup_path="fused")
    r = _requests(tiny, package, (8,))[0]
    lengths = r.lengths.copy()
    keep = int(lengths.sum()) - int(lengths[-1].sum())
    lengths[-1] = 0  # the last column has no ids at all
    req = ShardRequest(lengths=lengths, values=r.values[:keep])
    core.lookup(r)  # fill the staging buffer with more ids than the next request has
    out = core.lookup(req)
    assert not out[:, -core.columns[-1].dim:].any()
    np.testing.assert_allclose(out, ShardCore(package, 0, lookup_path="kernel").lookup(req), rtol=1e-6, atol=1e-6)
