"""The bench's per-stage breakdown read from a Prometheus page (serving/engine/stages.py): stage
times summed over replicas, and the towers' pooled-embedding batches by path beside them."""

from __future__ import annotations

from serving.engine.stages import breakdown, format_breakdown, parse_totals


def _page(lookups: int, lookup_ms: float, ipc: int, host: int) -> str:
    """A page as Ray's exporter writes it: two shard replicas' series of one stage, the towers' counter."""
    return f"""# HELP ray_recserve_stage_ms time per stage
# TYPE ray_recserve_stage_ms histogram
ray_recserve_stage_ms_bucket{{stage="shard-0.lookup",replica="a",le="5.0"}} {lookups}
ray_recserve_stage_ms_count{{stage="shard-0.lookup",replica="a"}} {lookups}
ray_recserve_stage_ms_sum{{stage="shard-0.lookup",replica="a"}} {lookup_ms}
ray_recserve_stage_ms_count{{replica="b",stage="shard-0.lookup"}} {lookups}
ray_recserve_stage_ms_sum{{replica="b",stage="shard-0.lookup"}} {lookup_ms}
# TYPE ray_recserve_pooled_batches_total counter
ray_recserve_pooled_batches_total{{deployment="DenseTower",path="ipc",replica="t1"}} {ipc}
ray_recserve_pooled_batches_total{{deployment="DenseTower",path="ipc",replica="t2"}} {ipc}
ray_recserve_pooled_batches_total{{deployment="DenseTower",path="host",replica="t1"}} {host}
"""


def test_stage_times_and_pooled_batches_per_request_between_two_scrapes():
    before, after = parse_totals(_page(10, 40.0, 5, 0)), parse_totals(_page(30, 120.0, 25, 10))
    assert after["shard-0.lookup"] == (60.0, 240.0)
    assert after["pooled_batches.ipc"] == (50.0, 0.0) and after["pooled_batches.host"] == (10.0, 0.0)
    rows = dict((s, (per, ms)) for s, per, ms in breakdown(before, after, requests=80))
    assert rows["shard-0.lookup"] == (0.5, 4.0)  # 40 lookups for 80 requests, 160 ms
    assert rows["pooled_batches.ipc"][0] == 0.5 and rows["pooled_batches.host"][0] == 0.125
    line = format_breakdown(breakdown(before, after, requests=80))
    assert "shard-0.lookup 4.00 (x0.50)" in line
    assert "pooled_batches.ipc x0.50" in line and "pooled_batches.host x0.12" in line


def test_a_page_without_the_counter_gives_stages_only():
    totals = parse_totals(_page(1, 2.0, 0, 0).split("# TYPE ray_recserve_pooled")[0])
    assert set(totals) == {"shard-0.lookup"}


def test_quarantined_ring_slots_are_counted_beside_the_paths():
    """recserve_pooled_ring_quarantined (no labels but the replica's) summed over the towers."""
    page = _page(1, 2.0, 3, 0) + """# TYPE ray_recserve_pooled_ring_quarantined_total counter
ray_recserve_pooled_ring_quarantined_total{deployment="DenseTower",replica="t1"} 2
ray_recserve_pooled_ring_quarantined_total{deployment="DenseTower",replica="t2"} 5
"""
    totals = parse_totals(page)
    assert totals["pooled_batches.quarantined"] == (7.0, 0.0)
    line = format_breakdown(breakdown({}, totals, requests=14))
    assert "pooled_batches.quarantined x0.50" in line
