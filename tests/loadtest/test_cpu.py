import subprocess
import sys

import pytest

from loadtest.cpu import CpuMeter, process_tree, processes_titled, role_of


# The child says when it is started and when it has burned BURN_S seconds of its own CPU time,
# so the test measures CPU time between two events, never wall time (any machine speed, any load).
BURN_S = 0.6
BUSY = f"""import sys, time
print("ready", flush=True)
sys.stdin.readline()
t = time.process_time()
while time.process_time() - t < {BURN_S}: pass
print("burned", flush=True)
sys.stdin.readline()
"""


def test_meter_counts_the_cpu_a_child_process_burns():
    proc = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"  # the interpreter's start-up is behind us
        meter = CpuMeter(lambda: process_tree(proc.pid))
        start = meter.read()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "burned\n"
        burned = meter.read() - start
        # the child's own clock counted BURN_S; the meter reads the same counters (10 ms ticks),
        # plus the few instructions of reading a line and printing one
        assert BURN_S - 0.05 <= burned <= BURN_S + 0.2, burned
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


def test_cpu_is_also_read_per_serving_role():
    import psutil

    me = psutil.Process()
    assert role_of(me) == "server"  # not a Serve replica, proxy or HAProxy
    meter = CpuMeter(lambda: [me])
    by_role = meter.read_by_role()
    assert set(by_role) == {"server"} and by_role["server"] == pytest.approx(meter.read(), abs=0.05)


def test_a_server_started_with_front_haproxy_is_not_taken_for_haproxy():
    """role_of looks at the executable: a process whose arguments say `--front haproxy` (as
    `recserve serve --monolith --front haproxy` does) is a server, the HAProxy it starts is "haproxy"."""
    import psutil

    from serving.ops.ports import free_port
    from serving.standalone.haproxy_front import Front

    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--front", "haproxy"])
    try:
        with Front("127.0.0.1", free_port(), f"127.0.0.1:{free_port()}", max_in_flight=1):
            front = [p for p in psutil.Process().children(recursive=True) if p.pid != server.pid]
            assert [role_of(p) for p in front] == ["haproxy"]
        assert role_of(psutil.Process(server.pid)) == "server"
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("title, role", [
    ("ray::ServeReplica:recserve:Router", "Router"),
    ("ray::ServeReplica:recserve@8f6f7927722c:shard-1", "shard-1"),
    # while a replica runs an actor method, Ray appends the method to its title
    ("ray::ServeReplica:recserve@8f6f7927722c:shard-1.check_health", "shard-1"),
    ("ray::ServeReplica:recserve:DenseTower.handle_request_with_rejection", "DenseTower"),
])
def test_a_replica_is_named_by_its_deployment_whatever_method_it_runs(title, role):
    import psutil

    proc = subprocess.Popen(["bash", "-c", f'exec -a "{title}" sleep 30'])
    try:
        p = psutil.Process(proc.pid)
        for _ in range(200):  # until bash has exec'd sleep under the title
            if p.cmdline()[:1] == [title]:
                break
            __import__("time").sleep(0.01)
        assert role_of(p) == role
    finally:
        proc.kill()
        proc.wait()
