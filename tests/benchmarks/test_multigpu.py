"""benchmarks/multigpu.py: how it reads bench rows and placements (CPU), and the GPU -> GPU
transfer timing (skipped without 2 GPUs)."""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "multigpu_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "multigpu.py")
multigpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multigpu)


def _row(eps: int, p99: float, errors: str = "", ok: int = 10) -> dict:
    return {"examples_per_s": str(eps), "p99_ms": str(p99), "errors": errors, "ok": str(ok)}  # as csv.DictReader


def test_best_under_p99_takes_the_most_examples_per_s_within_the_bound_and_without_errors():
    rows = [_row(1000, 20), _row(3000, 59.9), _row(5000, 60.1), _row(4000, 30, errors="DEADLINE_EXCEEDED:1"),
            _row(9000, 10, ok=0)]
    assert multigpu.best_under_p99(rows, 60.0)["examples_per_s"] == "3000"
    assert multigpu.best_under_p99([_row(5000, 61)], 60.0) is None


def test_scaling_table_gives_each_gpu_count_its_ratio_to_one_gpu_and_the_target():
    results = [{"workload": "dlrmv2", "gpus": 1, "shards": 1, "examples_per_s": 1000.0, "p99": 50.0},
               {"workload": "dlrmv2", "gpus": 2, "shards": 2, "examples_per_s": 1900.0, "p99": 55.0},
               {"workload": "dlrmv2", "gpus": 4, "shards": 4, "examples_per_s": 3000.0, "p99": 58.0},
               {"workload": "dlrmv2-2x", "gpus": 2, "shards": 2, "examples_per_s": None, "p99": None}]
    lines = multigpu.scaling_table(results, 60.0).splitlines()
    assert "| 1.90 | >= 1.8x: met |" in lines[3]
    assert "| 3.00 | >= 3.4x: missed |" in lines[4]
    assert "none under the bound" in lines[5] and lines[5].endswith("| - | - |")


def _replica(gpu: str | None) -> dict:
    return {"gpu_ids": [gpu] if gpu is not None else [], "cuda_visible_devices": gpu, "pid": 1}


def test_spread_problems_names_a_crowded_gpu_an_idle_one_and_a_shard_without_a_gpu():
    good = {"shard-0": [_replica("0")], "shard-1": [_replica("1")], "DenseTower": [_replica("0")],
            "Router": [_replica(None)]}
    assert multigpu.spread_problems(good, gpus=2, shards_per_gpu=1) == []
    crowded = {"shard-0": [_replica("0")], "shard-1": [_replica("0")]}
    problems = multigpu.spread_problems(crowded, gpus=2, shards_per_gpu=1)
    assert any("more than 1" in p for p in problems) and any("on 1 of 2 GPU(s)" in p for p in problems)
    assert multigpu.spread_problems({"shard-0": [_replica(None)]}, gpus=1, shards_per_gpu=1)[0].startswith(
        "shard-0: expected one GPU")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_transfer_moves_pooled_embeddings_between_gpus_both_ways_unchanged():
    rows = multigpu.run_transfer(argparse.Namespace(batch_sizes=[7, 512], width=26 * 128, iters=3))
    assert {(r["batch"], r["path"]) for r in rows} == {(b, p) for b in (7, 512) for p in ("direct (peer)", "pinned host")}
    assert all(r["ms"] > 0 and not math.isnan(r["GB_s"]) for r in rows)
