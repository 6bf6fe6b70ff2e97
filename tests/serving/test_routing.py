"""The router core: split by plan, rebase in the shard, merge partial pools of row-split tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recserve.batch import Bags, Batch
from recserve.package import ModelPackage
from recserve.synth import TrafficGenerator
from serving.engine.routing import Routing, concat_requests, identity_filter, load_feature_filter
from serving.engine.shard import ShardCore


def _only(tiny, feature: str, values: list[int], lengths: list[int]) -> Batch:
    B = len(lengths)
    sparse = {f: Bags.empty(B) for f in tiny.features}
    sparse[feature] = Bags(np.array(values, np.int64), np.array(lengths, np.int32))
    return Batch(np.zeros((B, tiny.dense_features), np.float32), sparse)


def test_a_shard_with_no_ids_in_the_request_is_not_called(tiny, tiny_packages):
    routing = Routing(ModelPackage.open(tiny_packages("table-3")).manifest)
    shard_of_user = next(k for k, cols in routing.columns.items() if any(c.feature == "user_id" for c in cols))
    requests = routing.split(_only(tiny, "user_id", [1, 2, 3], [2, 0, 1]))
    assert list(requests) == [shard_of_user]
    assert routing.split(_only(tiny, "user_id", [], [0, 0])) == {}


def test_ids_of_a_row_split_table_go_to_the_slice_that_holds_them(tiny, tiny_packages):
    manifest = ModelPackage.open(tiny_packages("capacity-3")).manifest
    routing = Routing(manifest)
    slices = manifest.plan.slices_of("t_item")
    assert len(slices) > 1, "the layout must split t_item"
    ids = [s.row_start for _, s in slices] + [s.row_end - 1 for _, s in slices]
    requests = routing.split(_only(tiny, "item_id", ids, [len(ids)]))
    assert sorted(requests) == sorted({k for k, _ in slices})
    for k, s in slices:
        r = requests[k]
        assert set(r.values.tolist()) == {s.row_start, s.row_end - 1}
        assert r.lengths.sum() == 2


def test_row_split_partial_pools_sum_to_the_whole_table_lookup(tiny, tiny_packages):
    split_pkg = ModelPackage.open(tiny_packages("load-3"))
    whole_pkg = ModelPackage.open(tiny_packages("singular-1"))
    batch = TrafficGenerator(tiny, seed=5, empty_bag_fraction=0.3).batch(9)
    got = {}
    for name, pkg in (("split", split_pkg), ("whole", whole_pkg)):
        routing = Routing(pkg.manifest)
        shards = {k: ShardCore(pkg, k) for k in routing.columns}
        outs = {k: shards[k].lookup(r) for k, r in routing.split(batch).items()}
        got[name] = routing.assemble(batch.batch_size, outs)  # [B, F, D]
    torch.testing.assert_close(got["split"], got["whole"], rtol=1e-6, atol=1e-6)


def test_batched_shard_requests_give_the_same_pools_as_one_by_one(tiny, tiny_packages):
    pkg = ModelPackage.open(tiny_packages("load-2"))
    routing = Routing(pkg.manifest)
    shard = ShardCore(pkg, 0)
    gen = TrafficGenerator(tiny, seed=6, empty_bag_fraction=0.4)
    requests = [routing.split(gen.batch(b)).get(0) for b in (1, 5, 3)]
    requests = [r for r in requests if r is not None]
    merged = shard.lookup(concat_requests(requests))
    np.testing.assert_allclose(merged, np.concatenate([shard.lookup(r) for r in requests]), rtol=1e-6, atol=1e-7)
    for single, batched in zip((shard.lookup(r) for r in requests), shard.lookup_many(requests)):
        np.testing.assert_allclose(single, batched, rtol=1e-6, atol=1e-7)


def test_the_feature_filter_loader_builds_what_the_import_path_names(tiny_packages, tmp_path, monkeypatch):
    from serving.fading.runtime import FadingFilter
    from serving.fading.store import ENV_STORE

    monkeypatch.setenv(ENV_STORE, str(tmp_path / "fading.sqlite"))  # the fading filter's store, not the checkout's
    manifest = ModelPackage.open(tiny_packages("table-2")).manifest
    for off in (None, "", "none"):
        assert load_feature_filter(off, manifest) is identity_filter
    assert isinstance(load_feature_filter("serving.fading.runtime:router_filter", manifest), FadingFilter)
    with pytest.raises(ValueError, match="module:factory"):
        load_feature_filter("serving.fading.runtime.router_filter", manifest)
