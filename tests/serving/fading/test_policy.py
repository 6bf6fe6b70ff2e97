"""The keep decision: accurate coverage, consistent per unit, reversible, lookups skipped."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.batch import Bags, Batch
from recserve.synth import TrafficGenerator
from recserve.workloads import load_workload
from serving.fading.policy import CONTROL, FADED, KEPT, FeatureFade, apply_fading, cohorts, key64, unit_draws

N = 100_000


def units(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63 - 1, n, dtype=np.int64).astype(np.uint64)


@pytest.mark.parametrize("coverage", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_observed_coverage_is_within_one_point_of_the_setting_over_100k_examples(coverage: float) -> None:
    c = cohorts(units(), "m", FeatureFade(feature="f", coverage=coverage))
    observed = float((c == KEPT).mean())
    assert abs(observed - coverage) < 0.01, (coverage, observed)


def test_coverage_applies_to_the_treatment_population_outside_the_control_cohort() -> None:
    c = cohorts(units(), "m", FeatureFade(feature="f", coverage=0.3, control_fraction=0.1))
    assert abs(float((c == CONTROL).mean()) - 0.1) < 0.01
    treated = c[c != CONTROL]
    assert abs(float((treated == KEPT).mean()) - 0.3) < 0.01


def test_sequential_unit_ids_are_faded_as_accurately_as_random_ones() -> None:
    c = cohorts(np.arange(N, dtype=np.uint64), "m", FeatureFade(feature="f", coverage=0.5))
    assert abs(float((c == KEPT).mean()) - 0.5) < 0.01


def test_a_unit_gets_the_same_treatment_in_every_request() -> None:
    fade = FeatureFade(feature="f", coverage=0.5, salt="s1", control_fraction=0.05)
    u = units(1000)
    first = cohorts(u, "m", fade)
    shuffled = np.random.default_rng(1).permutation(1000)
    again = cohorts(u[shuffled], "m", fade)  # other batches, other orders, another process
    np.testing.assert_array_equal(again, first[shuffled])


def test_lowering_coverage_only_removes_units_and_raising_it_back_restores_the_same_ones() -> None:
    u = units()
    kept = {c: cohorts(u, "m", FeatureFade(feature="f", coverage=c)) == KEPT for c in (1.0, 0.75, 0.5, 0.25, 0.0)}
    assert np.all(kept[0.5] <= kept[0.75]) and np.all(kept[0.25] <= kept[0.5]) and not kept[0.0].any()
    np.testing.assert_array_equal(cohorts(u, "m", FeatureFade(feature="f", coverage=0.5)) == KEPT, kept[0.5])


def test_features_and_salts_fade_independent_sets_of_units() -> None:
    u = units()
    a = cohorts(u, "m", FeatureFade(feature="a", coverage=0.5)) == FADED
    b = cohorts(u, "m", FeatureFade(feature="b", coverage=0.5)) == FADED
    a2 = cohorts(u, "m", FeatureFade(feature="a", coverage=0.5, salt="new")) == FADED
    assert abs(float((a & b).mean()) - 0.25) < 0.01
    assert abs(float((a & a2).mean()) - 0.25) < 0.01


def test_the_control_cohort_keeps_the_feature_at_coverage_zero() -> None:
    c = cohorts(units(), "m", FeatureFade(feature="f", coverage=0.0, control_fraction=0.05))
    assert set(np.unique(c)) == {CONTROL, FADED}


def test_a_faded_feature_becomes_empty_bags_and_its_ids_are_not_looked_up() -> None:
    dense = np.zeros((4, 2), np.float32)
    hist = Bags(np.array([1, 2, 3, 4, 5, 6], np.int64), np.array([2, 0, 3, 1], np.int32), np.arange(6, dtype=np.float32))
    item = Bags(np.array([7, 8, 9, 10], np.int64), np.ones(4, np.int32))
    batch = Batch(dense, {"hist": hist, "item": item}, np.arange(4, dtype=np.uint64))
    out, decision = apply_fading(batch, "m", {"hist": FeatureFade(feature="hist", coverage=0.0)})
    assert out.sparse["item"] is item  # untouched features pass through as they are
    assert out.sparse["hist"].lengths.tolist() == [0, 0, 0, 0] and out.sparse["hist"].values.size == 0
    assert out.sparse["hist"].weights is not None and out.sparse["hist"].weights.size == 0
    assert decision.lookups_skipped == {"hist": 6}


def test_partial_fading_keeps_the_ids_and_weights_of_kept_examples_in_order() -> None:
    lengths = np.array([2, 0, 3, 1, 2], np.int32)
    values = np.arange(8, dtype=np.int64) + 100
    batch = Batch(np.zeros((5, 1), np.float32), {"f": Bags(values, lengths, values.astype(np.float32))},
                  np.arange(5, dtype=np.uint64) * 977)
    out, decision = apply_fading(batch, "m", {"f": FeatureFade(feature="f", coverage=0.5)})
    faded = decision.cohorts["f"] == FADED
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    expect = np.concatenate([values[offsets[i]:offsets[i + 1]] for i in range(5) if not faded[i]] + [values[:0]])
    np.testing.assert_array_equal(out.sparse["f"].values, expect)
    np.testing.assert_array_equal(out.sparse["f"].weights, expect.astype(np.float32))
    np.testing.assert_array_equal(out.sparse["f"].lengths, np.where(faded, 0, lengths))
    assert decision.lookups_skipped["f"] == int(lengths[faded].sum())


def test_full_coverage_returns_the_batch_itself() -> None:
    batch = TrafficGenerator(load_workload("tiny"), seed=3).batch(64)
    out, decision = apply_fading(batch, "m", {"item_id": FeatureFade(feature="item_id", coverage=1.0, control_fraction=0.1)})
    assert out is batch and decision.lookups_skipped == {"item_id": 0}


def test_without_unit_ids_the_request_id_is_the_unit() -> None:
    bags = Bags(np.arange(256, dtype=np.int64), np.ones(256, np.int32))
    batch = Batch(np.zeros((256, 1), np.float32), {"f": bags}, None)
    fade = {"f": FeatureFade(feature="f", coverage=0.5)}
    seen = []
    for rid in ("req-1", "req-2", "req-3", "req-4", "req-1"):
        _, d = apply_fading(batch, "m", fade, request_id=rid)
        assert len(set(d.cohorts["f"].tolist())) == 1  # the whole request shares one treatment
        seen.append(int(d.cohorts["f"][0]))
    assert seen[0] == seen[4]


def test_unit_ids_of_the_wrong_length_are_rejected_naming_the_field() -> None:
    batch = Batch(np.zeros((3, 1), np.float32), {}, np.arange(2, dtype=np.uint64))
    with pytest.raises(ValueError, match="unit_ids"):
        apply_fading(batch, "m", {"f": FeatureFade(feature="f", coverage=0.5)})


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_coverage_outside_zero_one_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="coverage"):
        FeatureFade(feature="f", coverage=bad)


def test_the_integer_fast_path_decides_exactly_as_the_uniform_draws() -> None:
    u = units()
    keep_draw, control_draw = unit_draws(u, key64("m", "f", ""))
    for coverage in (0.0, 0.123456789, 0.5, 0.999999, 1.0):
        fade = FeatureFade(feature="f", coverage=coverage, control_fraction=0.07)
        expect = np.where(keep_draw >= coverage, FADED, KEPT)
        expect[control_draw < 0.07] = CONTROL
        np.testing.assert_array_equal(cohorts(u, "m", fade), expect)


def test_the_control_cohort_is_drawn_independently_of_the_keep_decision() -> None:
    keep_draw, control_draw = unit_draws(units(), np.uint64(12345))
    assert abs(float(np.corrcoef(keep_draw, control_draw)[0, 1])) < 0.01
    in_control = control_draw < 0.1
    assert abs(float((keep_draw[in_control] < 0.5).mean()) - 0.5) < 0.02
