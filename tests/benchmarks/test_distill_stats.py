"""benchmarks/distill.py's statistics: t quantiles by degrees of freedom, paired deltas against
the student alone, and contrasts of a run that trained only some of the variants."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "distill_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "distill.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_t_quantiles_are_students_and_round_towards_the_wider_one() -> None:
    assert bench.t95(5) == 2.571 and bench.t95(11) == 2.201 and bench.t95(29) == 2.045
    assert bench.t95(35) == bench.t95(30) == 2.042  # between listed dfs: the smaller df's, wider
    m, h = bench.interval(np.array([1.0, 2.0, 3.0]))
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / np.sqrt(3))


def test_contrasts_pair_variants_by_seed_and_init_and_skip_variants_not_trained() -> None:
    rows = [dict(seed=s, vertical=v, variant=var, init=i, ne=base + (0.01 * s if var != "alone" else 0) + 0.001 * i)
            for s in (0, 1) for v in ("v0-typical", "v1-low") for i in (0, 1)
            for var, base in (("alone", 0.5), ("AH", 0.49), ("AH x2", 0.48), ("AH+SA", 0.47))]
    c = bench.contrasts(rows, "ne", ["v1-low"])
    assert set(c) == {"AH+SA - AH", "AH+SA - AH x2", "AH x2 - AH"}  # no main, AH tuned, main+SA in this run
    np.testing.assert_allclose(c["AH+SA - AH"], [-0.02, -0.02])
    np.testing.assert_allclose(c["AH+SA - AH x2"], [-0.01, -0.01])
    d = bench.paired_deltas(rows, "ne")
    np.testing.assert_allclose(d[("v0-typical", "AH")], [-0.01, 0.0])
    np.testing.assert_allclose(d[("v0-typical", "null")], [0.001, 0.001])


def test_merge_refuses_runs_of_other_settings_or_shared_seeds(tmp_path) -> None:
    import argparse
    import json

    def run(name: str, seed: int, **changed) -> Path:
        args = dict(seeds=[seed], out=name, jobs=1, variants=["AH"], bias_trend=0.12, student_per_day=25_000)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(args={**args, **changed}, rows=[dict(seed=seed, variant="AH")])))
        return path

    def merge(*paths: Path) -> str:
        with pytest.raises(SystemExit) as e:
            bench.merge(argparse.Namespace(merge=list(paths), out=tmp_path / "out"))
        return str(e.value)

    assert merge(run("a", 0), run("b", 1, bias_trend=0.3, jobs=8)) == \
        f"--merge: {tmp_path / 'b.json'} differs from {tmp_path / 'a.json'} in bias_trend"
    assert merge(run("a", 0), run("c", 0, out="elsewhere")) == "--merge: the runs share seeds [0]"
    assert not (tmp_path / "out").exists()


def test_the_ages_sa_trains_on_follow_the_snapshot_cadence() -> None:
    import argparse

    def ages(every: int) -> tuple[float, float]:
        lo, hi = bench.training_ages(argparse.Namespace(eval_day=13, student_days=4, snapshot_every=every, delay=1.0))
        return round(lo, 3), round(hi, 3)

    assert ages(3) == (1.0, 4.0)  # days 9-12 scored by snapshots 6 (until day 10) and 9 (from day 10)
    assert ages(6) == (3.0, 7.0)  # all four days by snapshot 6
