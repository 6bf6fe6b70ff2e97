"""One package over several Ray nodes (issue 21): a real multi-node Ray on this machine
(ray.cluster_utils.Cluster: a raylet and an object store per node), deployed by `recserve serve
--address HEAD --place-on-hosts` as a user would. Refused with one shard host (the message names
the table), served on two: each shard on its own host, router and tower on the head, and the
scores equal the single-process reference (LocalRanker).

Runs benchmarks/multinode.py check in a process of its own: Ray can be initialised once per
process, and this xdist worker also holds the session's Ray (tests/serving/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_a_package_too_large_for_one_host_is_refused_naming_the_table_and_serves_on_two(tiny_packages, tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/multinode.py", "check", "--package", str(tiny_packages("table-2")),
                          "--hosts", "2", "--requests", "3", "--timeout", "240", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["problems"] == []
    refused = result["one_host"]
    assert refused["exit_code"] == 2 and "cannot place" in refused["message"] and "table 't_" in refused["message"]
    placement = result["placement"]
    shard_hosts = [r["host"] for k in range(2) for r in placement[f"shard-{k}"]]
    assert sorted(shard_hosts) == ["h1", "h2"]  # one shard per host, none on the head
    node_ids = {r["node_id"] for rs in placement.values() for r in rs}
    assert len(node_ids) == 3  # head (router, tower) and two shard nodes: three raylets
    assert [r["host"] for r in placement["Router"]] == ["h0"] and [r["host"] for r in placement["DenseTower"]] == ["h0"]
    assert result["requests"] == 3 and result["max_abs_diff"] <= 2e-3
    assert result["serve_exit_code"] == 0
