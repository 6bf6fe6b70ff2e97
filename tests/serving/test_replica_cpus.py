"""A replica's CPU reservation fits the Ray it runs on, not the machine: a Ray given more CPUs
than a small machine has reserves 1 per replica, a Ray given fewer than a large one reserves none
(before, a 16-core GPU host's replicas each asked for 1 CPU of a 2-CPU test Ray and never started)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_PROBE = """
import sys, ray
ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False, configure_logging=False)
from serving.app.builder import _actor, ray_node_cpus
print(ray_node_cpus(), _actor()["num_cpus"])
ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.parametrize("ray_cpus, reserved", [(2, 0.0), (16, 1.0)])
def test_a_replica_reserves_cpu_by_what_ray_was_given_not_by_the_machine(ray_cpus, reserved):
    run = subprocess.run([sys.executable, "-c", _PROBE, str(ray_cpus)], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    cpus, num_cpus = run.stdout.split()[-2:]
    assert int(cpus) == ray_cpus and float(num_cpus) == reserved, run.stdout
