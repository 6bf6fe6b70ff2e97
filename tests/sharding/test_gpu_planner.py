"""Planning for the GPUs of one host: per-shard memory from the GPU's, minus the reserve and the tower."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.cli import main
from recserve.planning import plan_workload_for_gpus, table_specs, tower_bytes
from recserve.workloads import load_workload
from sharding import GpuReserve, GpuTopology, PlannerError, PlannerErrorType, TableSpec, plan_for_gpus

LARGER = Path(__file__).resolve().parents[2] / "benchmarks" / "workloads" / "dlrmv2-2x.json"
H200 = 141 * 10**9  # bytes


def _gpu_bytes_worst_case(plan, topology: GpuTopology) -> int:
    """Bytes on the fullest GPU if Ray put the biggest shards together (what the budget must bound)."""
    k = topology.shards_per_gpu(plan.num_shards)
    biggest = sorted((sh.bytes for sh in plan.shards), reverse=True)[:k]
    towers = topology.tower_replicas * topology.tower_bytes if topology.tower == "shared" else 0
    return sum(biggest) + towers + topology.reserve.bytes_of(topology.gpu_memory)


def test_shard_memory_is_the_gpu_less_reserve_and_tower_over_the_shards_per_gpu():
    t = GpuTopology(gpus=2, gpu_memory=1000, tower_bytes=50, reserve=GpuReserve(fraction=0.1, fixed=30))
    assert t.usable_memory == 1000 - 100 - 30 - 50
    assert t.shards_per_gpu(4) == 2
    assert t.shard_memory(4) == (1000 - 100 - 30 - 50) // 2
    own = GpuTopology(gpus=3, gpu_memory=1000, tower="own", tower_bytes=50, reserve=GpuReserve(fraction=0.1, fixed=30))
    assert own.shard_gpus == 2 and own.usable_memory == 870  # the tower has a GPU of its own


def test_the_larger_workload_does_not_fit_one_h200_but_fits_two():
    w = load_workload(LARGER)
    tables = table_specs(w, "fp32")
    assert sum(t.bytes for t in tables) > H200
    with pytest.raises(PlannerError) as e:
        plan_workload_for_gpus(w, strategy="load", topology=GpuTopology(gpus=1, gpu_memory=H200))
    assert e.value.error_type is PlannerErrorType.INSUFFICIENT_MEMORY
    assert "cannot place table 't_cat_" in str(e.value) and "1 GPU(s)" in str(e.value)
    topology = GpuTopology(gpus=2, gpu_memory=H200, tower_bytes=tower_bytes(w))
    p = plan_workload_for_gpus(w, strategy="load", topology=topology)
    assert p.num_shards % 2 == 0
    assert _gpu_bytes_worst_case(p, topology) <= H200


@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("replicas", [1, 2])
def test_dlrmv2_plans_never_overfill_a_gpu(gpus, replicas):
    w = load_workload("dlrmv2")
    topology = GpuTopology(gpus=gpus, gpu_memory=H200, shard_replicas=replicas, tower_bytes=tower_bytes(w))
    try:
        p = plan_workload_for_gpus(w, strategy="load", topology=topology)
    except PlannerError as e:  # 104 GB x 2 replicas does not fit one GPU: the error says so
        assert gpus == 1 and replicas == 2 and "t_cat_" in str(e)
        return
    assert (p.num_shards * replicas) % gpus == 0  # every GPU holds as many replicas as the next
    assert _gpu_bytes_worst_case(p, topology) <= H200


def test_a_shard_count_that_does_not_spread_evenly_is_refused():
    tables = [TableSpec(name="a", rows=10, dim=4)]
    with pytest.raises(PlannerError, match="multiple of 4") as e:
        plan_for_gpus(tables, strategy="capacity", topology=GpuTopology(gpus=4, gpu_memory=10**6, reserve=GpuReserve(
            fraction=0, fixed=0)), num_shards=6)
    assert e.value.error_type is PlannerErrorType.INVALID_INPUT


def test_the_tower_on_its_own_gpu_needs_another_for_the_shards():
    with pytest.raises(PlannerError, match="leave no GPU"):
        GpuTopology(gpus=1, gpu_memory=10**9, tower="own")


def test_a_gpu_smaller_than_its_reserve_is_refused():
    with pytest.raises(PlannerError, match="leave nothing for tables"):
        GpuTopology(gpus=1, gpu_memory=2**30)  # 1 GiB < the 4 GiB fixed reserve


def test_plan_cli_plans_for_gpus_and_names_the_table_that_does_not_fit(capsys):
    assert main(["plan", "--workload", str(LARGER), "--strategy", "load", "--gpus", "2", "--gpu-memory", "141GB"]) == 0
    out = capsys.readouterr().out
    assert "gpus: 2 GPU(s) x 141,000,000,000 bytes" in out and "1 per GPU" in out
    assert main(["plan", "--workload", str(LARGER), "--strategy", "load", "--gpus", "1",
                 "--device-memory", "141GB"]) == 2
    assert "cannot place table 't_cat_" in capsys.readouterr().err
    assert main(["plan", "--workload", "tiny", "--strategy", "load", "--gpus", "2"]) == 2
    assert "--gpu-memory: required" in capsys.readouterr().err


def test_the_gpu_plan_counts_the_towers_ring_of_pooled_embeddings(capsys):
    from recserve.cli.plan import served_tower_bytes

    w = load_workload("dlrmv2")
    ring = 16 * 4096 * 26 * 128 * 2  # --pooled-ring-slots x the largest batch x features x D x float16
    assert served_tower_bytes(w) - tower_bytes(w) == ring  # 436 MB: what a tower logs for its ring
    assert main(["plan", "--workload", "dlrmv2", "--strategy", "load", "--gpus", "1", "--gpu-memory", "141GB"]) == 0
    assert f"1 x {served_tower_bytes(w):,} bytes" in capsys.readouterr().out
