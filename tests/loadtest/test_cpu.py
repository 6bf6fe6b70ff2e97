import subprocess
import sys
import time

import pytest

from loadtest.cpu import CpuMeter, process_tree, processes_titled


def test_meter_counts_the_cpu_a_child_process_burns():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", busy])
    try:
        meter = CpuMeter(lambda: process_tree(proc.pid))
        start = meter.read()
        time.sleep(1.5)
        burned = meter.read() - start
        assert 0.3 < burned < 1.5
        assert meter.pids() == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_exits_keeps_its_last_reading():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    meter = CpuMeter(lambda: process_tree(proc.pid))
    first = meter.read()
    proc.wait()
    assert meter.read() == pytest.approx(first)


def test_ray_titles_are_matched_only_inside_the_given_tree():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert processes_titled(("ServeReplica",), within=proc.pid) == []
    finally:
        proc.kill()
        proc.wait()
