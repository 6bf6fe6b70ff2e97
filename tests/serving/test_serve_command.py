"""`recserve serve` as an operator runs it: one real stack (a `recserve serve` process on
Ray Serve, the tiny model in 2 shards) started with its dashboard and HTTP ports taken, then
checked from the outside: the printed addresses, the progress, the printed client command,
`recserve scale` of one shard under load, and the listening sockets read from the OS."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from recserve.synth import TrafficGenerator
from serving.api.codec import encode_request
from serving.ops.ports import free_port
from serving.ops.scaling import replicas, serve_details

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("shard-0", "shard-1", "DenseTower", "Router")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def stack(tiny_packages, tmp_path_factory):
    held = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # another server's ports
    taken_dashboard, taken_http = (s.getsockname()[1] for s in held)
    grpc_port = free_port()
    state = tmp_path_factory.mktemp("serve-state")
    log_path = state / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RECSERVE_ARTIFACTS=str(state), RAY_USAGE_STATS_ENABLED="0")
    argv = [sys.executable, "-m", "recserve.cli", "serve", str(tiny_packages("table-2")), "--port", str(grpc_port),
            "--dashboard-port", str(taken_dashboard), "--http-port", str(taken_http), "--feature-filter", "none"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while "recserve: serving" not in log_path.read_text():
            assert proc.poll() is None, f"recserve serve exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"not serving after 600 s:\n{log_path.read_text()}"
            tree = _tree(proc.pid) or tree
            time.sleep(1)
        text = log_path.read_text()
        dashboard = re.search(r"Ray dashboard (http://127\.0\.0\.1:\d+)", text).group(1)
        yield SimpleNamespace(proc=proc, log=log_path, grpc_port=grpc_port, dashboard=dashboard, state=state,
                              taken_dashboard=taken_dashboard, taken_http=taken_http, env=env)
    finally:
        tree = _tree(proc.pid) or tree
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
        _, alive = psutil.wait_procs([p for p in tree if p.is_running()], timeout=15)
        for p in alive:  # started by this test, in its own session
            p.kill()
        for s in held:
            s.close()


def test_taken_dashboard_and_http_ports_fall_back_to_free_ones_and_are_printed(stack):
    text = stack.log.read_text()
    dashboard_port = int(stack.dashboard.rsplit(":", 1)[1])
    assert dashboard_port != stack.taken_dashboard
    assert f"({stack.taken_dashboard} was taken: using a free port)" in text
    http = re.search(rf"Serve HTTP +127\.0\.0\.1:(\d+) \({stack.taken_http} was taken", text)
    assert http and int(http.group(1)) != stack.taken_http
    assert serve_details(stack.dashboard)["applications"]["recserve"]["status"] == "RUNNING"  # token accepted


def test_the_first_run_prints_replica_progress_and_no_request_log(stack):
    text = stack.log.read_text()
    progress = [line for line in text.splitlines() if line.startswith("recserve: replicas")]
    assert progress, text
    assert all(name in progress[-1] for name in DEPLOYMENTS)


def test_the_printed_client_command_works_as_printed(stack):
    command = re.search(r"recserve: try  (.+)", stack.log.read_text()).group(1)
    run = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=""))
    assert run.returncode == 0, run.stderr
    assert 'model: "tiny"' in run.stdout


def test_scaling_one_shard_keeps_the_other_replica_processes_and_fails_no_request(stack, tiny):
    from serving.api.client import RankingClient

    def snapshot() -> dict[str, set[tuple[str, int]]]:
        details = serve_details(stack.dashboard)
        return {d: {(r["actor_id"], r["pid"]) for r in replicas(details, "recserve", d) if r["state"] == "RUNNING"}
                for d in DEPLOYMENTS}

    before = snapshot()
    assert all(len(v) == 1 for v in before.values()), before
    batch = TrafficGenerator(tiny, seed=3).batch(4)
    sparse = {f: (b.values, b.lengths) for f, b in batch.sparse.items()}
    outcomes: list[str] = []
    stop = threading.Event()

    def load() -> None:  # light load: ~20 requests/s for the whole scale-up and down
        with RankingClient(f"127.0.0.1:{stack.grpc_port}") as client:
            while not stop.is_set():
                try:
                    scores = client.predict(batch.dense, sparse, timeout=20)
                    outcomes.append("OK" if np.isfinite(scores).all() and len(scores) == 4 else "BAD")
                except Exception as e:  # noqa: BLE001  counted, reported below
                    details = e.details() if hasattr(e, "details") else str(e)
                    outcomes.append(f"{type(e).__name__}: {details}")
                time.sleep(0.05)

    sender = threading.Thread(target=load)
    sender.start()
    try:
        time.sleep(1)
        scale = [sys.executable, "-m", "recserve.cli", "scale", "shard-0", "2"]  # the state file names the stack
        up = subprocess.run(scale, cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "shard-0: 2/2 running" in up.stdout
        during = snapshot()
        down = subprocess.run([*scale[:-1], "1", "--dashboard", stack.dashboard], cwd=ROOT, env=stack.env,
                              capture_output=True, text=True, timeout=600)
        assert down.returncode == 0, down.stdout + down.stderr
        time.sleep(1)
    finally:
        stop.set()
        sender.join()
    after = snapshot()
    assert len(during["shard-0"]) == 2 and before["shard-0"] < during["shard-0"]
    assert len(after["shard-0"]) == 1 and after["shard-0"] < during["shard-0"]
    for name in ("shard-1", "DenseTower", "Router"):
        assert before[name] == during[name] == after[name], name  # same actors, same processes
    failed = [o for o in outcomes if o != "OK"]
    assert len(outcomes) > 20 and failed == [], failed[:5]


def test_scale_names_a_deployment_that_does_not_exist(stack):
    run = subprocess.run([sys.executable, "-m", "recserve.cli", "scale", "shard-9", "2", "--dashboard",
                          stack.dashboard], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "no deployment 'shard-9'" in run.stderr and "shard-0" in run.stderr


def test_ray_runs_on_the_loopback_node_address(stack):
    details = serve_details(stack.dashboard)
    assert {p["node_ip"] for p in details["proxies"].values()} == {"127.0.0.1"}
    nodes = {r["node_ip"] for d in DEPLOYMENTS for r in replicas(details, "recserve", d)}
    assert nodes == {"127.0.0.1"}


def _listening(pid: int) -> list[tuple[int, str, str, int]]:
    out = []
    for p in _tree(pid):
        try:
            title = " ".join(p.cmdline()) or p.name()
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        out += [(p.pid, title[:70], c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_every_socket_of_the_stack_listens_on_loopback(stack):
    """Read from the OS: Ray's GCS, raylet, workers, agents, dashboard, Serve's proxies and the
    replicas' gRPC servers (serving/ops/loopback.py), all on 127.0.0.1."""
    sockets = _listening(stack.proc.pid)
    dashboard = int(stack.dashboard.rsplit(":", 1)[1])
    http = int(re.search(r"Serve HTTP +127\.0\.0\.1:(\d+)", stack.log.read_text()).group(1))
    ports = {port for _, _, _, port in sockets}
    assert {stack.grpc_port, dashboard, http} <= ports
    assert len({pid for pid, *_ in sockets}) >= 8  # the driver, GCS, raylet, agents, proxy, replicas
    wide = [s for s in sockets if s[2] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert wide == [], wide


def test_a_stop_while_the_replicas_start_shuts_down_cleanly(tiny_packages, tmp_path):
    """Ctrl-C (here SIGTERM) while the deploy is still running: Serve and Ray stop, nothing is
    left behind, and the exit status is 0 (the deploy's thread used to outlive Ray's shutdown,
    and Ray then ended the process with status 1)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RECSERVE_ARTIFACTS=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    argv = [sys.executable, "-m", "recserve.cli", "serve", str(tiny_packages("table-2")), "--port", str(free_port()),
            "--dashboard-port", str(free_port()), "--http-port", str(free_port()), "--feature-filter", "none"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while "recserve: replicas" not in log_path.read_text():  # the deploy has begun
            assert proc.poll() is None, f"recserve serve exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no replica progress after 300 s:\n{log_path.read_text()}"
            tree = _tree(proc.pid) or tree
            time.sleep(0.2)
        tree = _tree(proc.pid) or tree
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_path.read_text()
        text = log_path.read_text()
        assert "recserve: stopped" in text, text
        _, alive = psutil.wait_procs([p for p in tree if p.is_running()], timeout=30)
        assert not alive, f"left running: {[p.name() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _tree(proc.pid) + tree:
            if p.is_running():
                p.kill()


def test_deploy_switches_the_running_stack_to_a_new_version(stack, tiny_packages, tiny):
    """`recserve deploy PACKAGE` as the docs show it, against the running `recserve serve` (found
    through its state file): it must reach that stack's loopback-only, token-protected Ray.
    Last of the tests on the shared stack: it serves another version afterwards."""
    from recserve.package import ModelPackage
    from serving.api.client import RankingClient

    package = tiny_packages("load-2")  # the same model under another plan: another version
    version = ModelPackage.open(package).manifest.version
    env = {k: v for k, v in stack.env.items() if k != "RAY_AUTH_MODE"}  # as a user's shell has it
    run = subprocess.run([sys.executable, "-m", "recserve.cli", "deploy", str(package)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{version} is live" in run.stdout
    batch = TrafficGenerator(tiny, seed=5).batch(4)
    with RankingClient(f"127.0.0.1:{stack.grpc_port}") as client:
        client.wait_until_serving("tiny", version)
        response = client.predict_raw(encode_request(batch.dense, {f: (b.values, b.lengths)
                                                                   for f, b in batch.sparse.items()}), timeout=20)
    assert response.version == version and len(response.scores) == 4
