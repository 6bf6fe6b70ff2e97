"""Replicas on GPUs through a real Ray: a local Ray told of 2 GPUs it need not have (scheduling
only; the replicas run on the CPU) places 4 shards two per GPU and the tower beside them, and the
served scores equal the CPU reference. Runs benchmarks/multigpu.py check in its own process (its
own Ray instance beside the session's)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_shards_spread_over_fake_gpus_and_score_like_the_cpu_reference(tmp_path):
    package = tmp_path / "tiny-table-4"
    subprocess.run([sys.executable, "-m", "recserve.cli", "export", "--workload", "tiny", "--init", "random",
                    "--seed", "3", "--strategy", "table", "--shards", "4", "--out", str(package)],
                   check=True, cwd=ROOT, capture_output=True)
    run = subprocess.run([sys.executable, "benchmarks/multigpu.py", "check", "--package", str(package), "--gpus", "2",
                          "--fake-gpus", "--device", "cpu", "--requests", "3", "--num-cpus", "2", "--timeout", "300",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    placement = result["placement"]
    shard_gpus = [r["gpu_ids"] for name, rs in placement.items() if name.startswith("shard-") for r in rs]
    assert len(shard_gpus) == 4 and all(len(g) == 1 for g in shard_gpus)
    assert Counter(g[0] for g in shard_gpus) == {"0": 2, "1": 2}  # two shards per GPU
    for name in ("shard-0", "DenseTower"):
        (replica,) = placement[name]
        assert replica["cuda_visible_devices"] == replica["gpu_ids"][0]  # Ray pins the replica to its GPU
    assert placement["Router"][0]["gpu_ids"] == []
    assert result["requests"] == 3 and result["max_abs_diff"] <= 2e-3 and result["problems"] == []
