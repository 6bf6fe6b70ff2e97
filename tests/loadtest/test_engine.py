"""``recserve bench --engine`` on the CPU: the shard and tower cores in one process, every
figure written, the tower's low-precision error within its bound, the MLPerf figure beside."""

from __future__ import annotations

import json

import pytest

from loadtest.engine import EngineError, EngineOptions, run_engine
from serving.engine.tower import LOWP_SCORE_BOUND


def test_the_engine_bench_writes_every_figure(tiny_packages, tmp_path):
    rows = run_engine(EngineOptions(package=tiny_packages("singular-1"), device="cpu", batch_sizes=(8, 32),
                                    seconds=0.05, out_dir=tmp_path))
    assert [r.batch for r in rows] == [8, 32]
    for r in rows:
        assert r.ids > 0 and r.engine_eps > 0 and r.engine_io_eps > 0 and r.plain_eps > 0 and r.lookup_ms > 0
    raw = json.loads((tmp_path / "engine.json").read_text())
    assert 0 < raw["tower_lowp_max_abs_diff"] <= LOWP_SCORE_BOUND[__import__("torch").float16]
    assert raw["lookup_rel_err"] < 1e-3  # fp16 output of fp32 tables: rounded once
    table = (tmp_path / "engine.md").read_text()
    assert "plain torch ex/s" in table and "MLPerf" in table and "| 32 |" in table


def test_plain_torch_needs_a_one_shard_package(tiny_packages, tmp_path):
    rows = run_engine(EngineOptions(package=tiny_packages("table-2"), device="cpu", batch_sizes=(8,),
                                    seconds=0.02, out_dir=tmp_path))
    assert rows[0].plain_eps is None and rows[0].engine_eps > 0
    assert "n/a" in (tmp_path / "engine.md").read_text()


def test_engine_options_name_what_is_wrong(tmp_path):
    with pytest.raises(EngineError, match="--package"):
        EngineOptions(package=tmp_path)
