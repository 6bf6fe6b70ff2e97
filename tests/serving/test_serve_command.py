"""`recserve serve` as an operator runs it: one real stack (a `recserve serve` process on
Ray Serve, version v1 of the tiny model in 2 shards) started with its dashboard and HTTP ports
taken, then checked from the outside: the printed addresses, the progress, the printed client
command, `recserve scale` of one shard under load, the listening sockets read from the OS, and
the commands an operator runs from another shell against it (`recserve deploy`, `recserve
fade`), each as a subprocess."""

from __future__ import annotations

import ipaddress
import json
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
from serving.config import AppArgs
from serving.ops.ports import free_port
from serving.ops.scaling import app_of, replicas, serve_details
from tests.serving.fronts import front_lines, haproxies_of, listeners

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("shard-0", "shard-1", "DenseTower", "Router")
FP16_TOL = 1e-3  # float16 pooled embeddings on the wire (the default) against the fp32 torchrec reference


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def stack(two_versions, tiny, tmp_path_factory):
    held = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # another server's ports
    taken_dashboard, taken_http = (s.getsockname()[1] for s in held)
    grpc_port = free_port()
    state = tmp_path_factory.mktemp("serve-state")
    log_path = state / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RECSERVE_ARTIFACTS=str(state), RAY_USAGE_STATS_ENABLED="0",
               RECSERVE_FADE_STORE=str(state / "fading.sqlite"))  # the routers' fading store
    # as a user runs it: the default feature filter (fading, over the store in RECSERVE_ARTIFACTS)
    # every request's examples logged, written only at the stop (an hour's flush interval): the
    # teardown checks that Ctrl-C writes them all (the routers' graceful stop)
    example_log = state / "example-log"
    argv = [sys.executable, "-m", "recserve.cli", "serve", str(two_versions["v1"][0]), "--port", str(grpc_port),
            "--dashboard-port", str(taken_dashboard), "--http-port", str(taken_http),
            "--log-rate", "1", "--log-dir", str(example_log), "--log-flush-s", "3600",
            "--router-replicas", "2", "--router-max-replicas", "3"]  # behind the front (the defaults)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    tree: list[psutil.Process] = []
    served = False
    try:
        deadline = time.monotonic() + 600
        while "recserve: serving" not in log_path.read_text():
            assert proc.poll() is None, f"recserve serve exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"not serving after 600 s:\n{log_path.read_text()}"
            tree = _tree(proc.pid) or tree
            time.sleep(1)
        text = log_path.read_text()
        dashboard = re.search(r"Ray dashboard (http://127\.0\.0\.1:\d+)", text).group(1)
        from serving.api.client import RankingClient

        with RankingClient(f"127.0.0.1:{grpc_port}") as client:  # requests the stop must log, whichever tests run
            for i, n in enumerate((3, 1, 8)):
                batch = TrafficGenerator(tiny, seed=60 + i).batch(n)
                client.predict(batch.dense, {f: (b.values, b.lengths) for f, b in batch.sparse.items()},
                               request_id=f"before-stop-{i}", timeout=60)
        served = True
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
    if served:
        _check_the_stop(proc, log_path, example_log)


BEFORE_STOP = {f"before-stop-{i}" for i in range(3)}  # the fixture's requests, served by v1


def _logged_ids(example_log: Path) -> set[str]:
    import pyarrow.parquet as pq

    return {i for f in example_log.glob("part-*.parquet") for i in pq.read_table(f, columns=["request_id"])["request_id"].to_pylist()}


def _check_the_stop(proc: subprocess.Popen, log_path: Path, example_log: Path) -> None:
    """After Ctrl-C: a clean exit that prints no failure (serve.shutdown() made Ray print its own
    controller's "graceful_shutdown failed"), no stop waited out by Serve (direct ingress held the
    Router 30 s for load balancers that are not there), and the requests served before the stop are in the
    example log (an hour's flush interval: written by the stop), each request whole."""
    import pyarrow.parquet as pq

    text = log_path.read_text()
    assert proc.returncode == 0 and "recserve: stopped" in text, text[-3000:]
    assert "failed to shut down" not in text, text[-3000:]
    stop = text[text.index("recserve: shutting down"):]  # no failure printed by the stop itself
    assert not any(word in stop for word in ("failed", "Traceback", "Error")), stop[-3000:]
    files = sorted(example_log.glob("part-*.parquet"))
    assert files, f"nothing logged in {example_log}"
    request_ids = set()
    for f in files:  # a request's rows lie together, example_index 0, 1, ..., its size - 1
        rows = pq.read_table(f, columns=["request_id", "example_index"]).to_pydict()
        request_ids.update(rows["request_id"])
        expected = 0
        for index in rows["example_index"]:
            assert index in (0, expected), (f.name, index, expected)
            expected = index + 1
    assert BEFORE_STOP <= request_ids, sorted(request_ids)[:20]


def test_a_taken_dashboard_port_falls_back_to_a_free_one_and_is_printed(stack):
    text = stack.log.read_text()
    dashboard_port = int(stack.dashboard.rsplit(":", 1)[1])
    assert dashboard_port != stack.taken_dashboard
    assert f"({stack.taken_dashboard} was taken: using a free port)" in text
    assert serve_details(stack.dashboard)["applications"]["recserve"]["status"] == "RUNNING"  # token accepted


def test_the_shared_ingress_runs_no_serve_proxy_and_no_serve_http(stack):
    """The Routers answer gRPC themselves: Serve starts no proxy actor (nor, in the replicas,
    its direct ingress: an idle stack 17% less CPU), and the log says Serve's HTTP is off."""
    from loadtest.cpu import processes_titled

    assert "Serve HTTP    off (--ingress shared" in stack.log.read_text()
    assert serve_details(stack.dashboard)["proxies"] == {}
    assert processes_titled(["ProxyActor"], within=stack.proc.pid) == []
    assert len(processes_titled(["ServeReplica:recserve:Router"], within=stack.proc.pid)) >= 2


def test_the_bench_tells_every_serving_process_by_its_deployment(stack):
    """`recserve bench`'s CPU-per-process column reads each replica's deployment from the title
    Ray 2.60 gives its process (it had read an older format and summed every replica as "server")."""
    from loadtest.cpu import ray_serve_processes, role_of

    roles = [role_of(p) for p in ray_serve_processes(within=stack.proc.pid)]
    assert set(DEPLOYMENTS) <= set(roles) and "server" not in roles, roles
    assert roles.count("haproxy") == 1  # the front


def _app(details: dict, deployment: str) -> str:
    """The stack's application holding ``deployment`` (the router's, or the live version's)."""
    return app_of(details, deployment, "recserve")


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
        return {d: {(r["actor_id"], r["pid"]) for r in replicas(details, _app(details, d), d)
                    if r["state"] == "RUNNING"} for d in DEPLOYMENTS}

    before = snapshot()
    assert {d: len(v) for d, v in before.items()} == {"shard-0": 1, "shard-1": 1, "DenseTower": 1, "Router": 2}, before
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


def test_serve_runs_the_first_version_in_its_own_application(stack):
    """The layout a swap leaves (serving/app/rollout.py): the router alone in "recserve", the
    version's shards and tower in "recserve@v1", so the next deploy retires them whole."""
    apps = serve_details(stack.dashboard)["applications"]
    assert set(apps["recserve"]["deployments"]) == {"Router"}
    assert {"shard-0", "shard-1", "DenseTower"} <= set(apps["recserve@v1"]["deployments"])


def test_ray_runs_on_the_loopback_node_address(stack):
    details = serve_details(stack.dashboard)
    assert {p["node_ip"] for p in details["proxies"].values()} <= {"127.0.0.1"}  # none with --ingress shared
    nodes = {r["node_ip"] for d in DEPLOYMENTS for r in replicas(details, _app(details, d), d)}
    assert nodes == {"127.0.0.1"}


def test_every_replica_writes_its_log_file_at_once(stack):
    """Serve's replica log files (Ray's session_dir/logs/serve) have each replica's start-up as it
    happens: throughput-optimized Serve kept them in memory, and the files stayed empty."""
    session_dir = json.loads((stack.state / "serving.json").read_text())["session_dir"]
    logs = {p.name: p.read_text(errors="replace") for p in Path(session_dir, "logs", "serve").glob("replica_*.log")}
    started = {name for name, text in logs.items() if "Finished initializing replica" in text}
    for deployment in ("Router", "shard-0", "shard-1", "DenseTower"):
        assert any(f"_{deployment}_" in name for name in started), (deployment, sorted(logs))


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
    ports = {port for _, _, _, port in sockets}
    assert {stack.grpc_port, dashboard} <= ports
    assert len({pid for pid, *_ in sockets}) >= 8  # the driver, GCS, raylet, agents, proxy, replicas
    # 127/8 is loopback: behind the front each Router listens on 127.0.1.k
    wide = [s for s in sockets if not ipaddress.ip_address(s[2].removeprefix("::ffff:")).is_loopback]
    assert wide == [], wide


def test_one_callers_calls_reach_both_routers_through_the_front(stack, two_versions, tiny):
    """`--router-replicas 2` with the defaults: HAProxy on --port, each Router on a loopback address
    of its own (read from the OS); one caller's channel reaches both, every score right."""
    import grpc

    from recserve.v1 import ranker_pb2_grpc
    from serving.api.codec import encode_request
    from serving.engine.local_ranker import LocalRanker

    front = haproxies_of(stack.proc.pid)
    assert len(front) == 1 and listeners(stack.grpc_port) == {"127.0.0.1": front[0].pid}
    before = front_lines(front[0])
    up = {address for address, line in before.items() if line["status"] == "UP"}
    assert len(up) >= 2, before  # 2 to 3 (autoscaling)
    port = int(next(iter(up)).rsplit(":", 1)[1])
    routers = {pid for ip, pid in listeners(port).items() if f"{ip}:{port}" in up}
    titles = [" ".join(psutil.Process(pid).cmdline()) for pid in routers]
    assert len(routers) == len(up) and all("Router" in t for t in titles), titles
    batch = TrafficGenerator(tiny, seed=81).batch(32)
    request = encode_request(batch.dense, {f: (b.values, b.lengths) for f, b in batch.sparse.items()},
                             unit_ids=batch.unit_ids)
    expected = {v: LocalRanker.load(pkg).score(batch) for v, (pkg, *_) in two_versions.items()}
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as ch:  # one channel, one connection
        for _ in range(16):
            reply = ranker_pb2_grpc.RankerStub(ch).Predict(request, timeout=60)
            scores = np.asarray(reply.scores, dtype=np.float32)
            want = expected[reply.version]
            assert np.allclose(scores, want, atol=FP16_TOL), np.abs(scores - want).max()
    after = front_lines(front[0])
    # one call at a time to the router with the fewest in flight: HAProxy takes the routers in turn
    served = {address: after[address]["calls"] - before[address]["calls"] for address in up}
    assert sum(served.values()) == 16 and all(n >= 16 // len(up) - 1 for n in served.values()), served


def test_the_routers_doors_adapt_by_default_and_report_their_depth(stack):
    """The default stack's doors adapt (serving/engine/concurrency.py) and share the stack's
    max_in_flight (32) among the routers (up to 3 here: 11 each), so the front starts each line
    at 11 + a quarter of it waiting and says so; each Router reports its door's depth as the
    gauge recserve_router_door_depth, never past its share."""
    import urllib.request

    from serving.engine.concurrency import may_wait

    working, waiting = AppArgs(package="p", router_replicas=2, router_max_replicas=3).router_door()
    share = working + may_wait(working, waiting)
    assert (working, share) == (11, 13)
    assert f"each adapting its depth to its throughput's knee, from {share} requests" in stack.log.read_text()
    metrics = re.search(r"metrics \(Prometheus[^)]*\) on (http://\S+/metrics)", stack.log.read_text()).group(1)
    deadline, depths = time.monotonic() + 120, []
    while not depths and time.monotonic() < deadline:  # a sample, not only its HELP line
        time.sleep(2)
        page = urllib.request.urlopen(metrics, timeout=10).read().decode()
        depths = [float(v) for v in re.findall(r"^\w*recserve_router_door_depth(?:\{[^}]*\})? (\S+)$", page, re.M)]
    assert depths and all(1 <= d <= share for d in depths), depths


def test_router_max_replicas_autoscales_the_router_on_its_requests_in_flight(stack):
    """`--router-replicas 2 --router-max-replicas 3`: Serve runs the Router between 2 and 3 replicas
    on InFlightPolicy (tests/serving/test_autoscaling.py has the controller add one under load)."""
    router = serve_details(stack.dashboard)["applications"]["recserve"]["deployments"]["Router"]
    scaling = router["deployment_config"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (2, 3), scaling
    assert scaling["policy"]["policy_function"] == "serving.app.autoscaling:InFlightPolicy", scaling
    assert scaling["target_ongoing_requests"] == 11 // 2, scaling  # half a router's share of the door


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


def _recserve(stack, *argv: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m recserve.cli ARGV`` from another shell: a fresh process, the stack found
    through the state file in RECSERVE_ARTIFACTS unless told otherwise."""
    return subprocess.run([sys.executable, "-m", "recserve.cli", *argv], cwd=ROOT, env=env or stack.env,
                          capture_output=True, text=True, timeout=timeout)


def _process_titles(stack) -> list[str]:
    titles = []
    for p in _tree(stack.proc.pid):
        try:
            titles.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return titles


def test_deploy_from_another_shell_swaps_versions_under_load_and_retires_the_old_one(stack, two_versions, tiny,
                                                                                      helpers, tmp_path):
    """`recserve deploy` as its own process (it attaches to the stack's loopback Ray through
    the state file): a corrupt package is refused before anything changes, then v2 goes live
    under load with no failed request and no mixed version, and v1's shards and tower are gone."""
    import shutil

    from serving.api.client import RankingClient

    references = {v: ref for v, (_, ref) in two_versions.items()}
    bad = shutil.copytree(two_versions["v2"][0], tmp_path / "v2-corrupt")
    with open(bad / "shards" / "shard-1.safetensors", "ab") as f:
        f.write(b"corrupt")
    with RankingClient(f"127.0.0.1:{stack.grpc_port}") as client:
        with helpers.Load(client, references, tiny, helpers, atol=FP16_TOL) as load:
            time.sleep(1)
            refused = _recserve(stack, "deploy", str(bad), timeout=120)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert "refused" in refused.stderr and "shard-1.safetensors" in refused.stderr
            run = _recserve(stack, "deploy", str(two_versions["v2"][0]), "--drain-s", "10")
            time.sleep(2)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "attached to the stack's Ray at 127.0.0.1:" in run.stdout
        assert "tiny v2 is live" in run.stdout
        versions = [v for v, _ in load.results]
        assert load.errors == [], load.errors[:5]
        assert all(ok for _, ok in load.results), "every score matches the reference of the version that answered"
        assert "v1" in versions and versions[-10:] == ["v2"] * 10, versions[-12:]
        assert client.model_info().version == "v2"
    apps = serve_details(stack.dashboard)["applications"]
    assert "recserve@v1" not in apps and set(apps["recserve"]["deployments"]) == {"Router"}
    assert {"shard-0", "shard-1", "DenseTower"} <= set(apps["recserve@v2"]["deployments"])
    deadline = time.monotonic() + 30  # the old version's replica processes exit
    while any("ServeReplica:recserve@v1:" in t for t in _process_titles(stack)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [t for t in _process_titles(stack) if "ServeReplica:recserve@v1:" in t]
    # the router closed v1's example log once v1 drained: the rows it held (the fixture's requests,
    # an hour before their flush) are written now, not lost at the stop or kept by a writer thread
    deadline = time.monotonic() + 30
    while not _logged_ids(stack.state / "example-log") >= BEFORE_STOP and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _logged_ids(stack.state / "example-log") >= BEFORE_STOP


def test_teacher_score_runs_on_the_running_stacks_ray(stack, two_versions, tiny, tmp_path):
    """`recserve teacher score --address stack` from another shell: the job attaches to the Ray of
    the running `recserve serve` (loopback, its token) and scores a log there; the stack serves on."""
    import pyarrow.parquet as pq

    from serving.api.client import RankingClient
    from serving.example_log import ExampleLog, ExampleLogConfig

    log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=str(tmp_path / "log")), model="tiny", version="v1",
                     features=tiny.features)
    for i in range(3):
        batch = TrafficGenerator(tiny, seed=40 + i).batch(20)
        assert log.submit(f"t{i}", batch, np.zeros(20, np.float32))
    log.close()
    run = _recserve(stack, "teacher", "score", "--logs", str(tmp_path / "log"), "--teacher", str(two_versions["v2"][0]),
                    "--out", str(tmp_path / "scores"), "--address", "stack", "--batch-size", "32", timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "60 unique scored" in run.stdout, run.stdout[-2000:]
    assert pq.read_table(tmp_path / "scores").num_rows == 60
    with RankingClient(f"127.0.0.1:{stack.grpc_port}") as client:
        assert client.model_info().model == "tiny"


def test_deploy_fails_within_seconds_naming_the_address_when_no_stack_answers(two_versions, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), RECSERVE_ARTIFACTS=str(tmp_path))
    package = str(tmp_path / "no-package")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "recserve.cli", "deploy", package], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "refused" in run.stderr  # the package is checked first
    address = f"127.0.0.1:{free_port()}"
    for argv, named in ((["--address", address], f"no Ray GCS answers at {address}"),
                        ([], str(tmp_path / "serving.json"))):
        run = subprocess.run([sys.executable, "-m", "recserve.cli", "deploy", str(two_versions["v2"][0]), *argv], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stdout + run.stderr
        assert named in run.stderr, run.stderr
    assert time.monotonic() - started < 90


def test_fade_from_another_shell_reaches_the_running_routers(stack, two_versions, tiny, tmp_path):
    """`recserve fade serve` (the control plane over the stack's store) and `recserve fade set`,
    each its own process: the running routers serve the faded scores (those of a local ranker
    reading the same store), then the full ones again."""
    from serving.api.client import RankingClient
    from serving.engine.local_ranker import LocalRanker
    from serving.fading.runtime import FadingFilter
    from serving.fading.store import FadingStore

    port = free_port()
    (tmp_path / "tokens.txt").write_text("operator s3cret\n")
    log_path = tmp_path / "fade-serve.log"
    with open(log_path, "w") as log:
        control = subprocess.Popen([sys.executable, "-m", "recserve.cli", "fade", "serve", "--port", str(port),
                                    "--tokens-file", str(tmp_path / "tokens.txt")], cwd=ROOT, env=stack.env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = dict(stack.env, RECSERVE_FADE_TOKEN="s3cret")
    fade = ("--addr", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        while "listening" not in log_path.read_text():
            assert control.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        with RankingClient(f"127.0.0.1:{stack.grpc_port}") as client:
            package = two_versions[client.model_info().version][0]
            batch = TrafficGenerator(tiny, seed=77).batch(16)
            sparse = {f: (b.values, b.lengths) for f, b in batch.sparse.items()}
            full = client.predict(batch.dense, sparse, unit_ids=batch.unit_ids, timeout=30)
            run = _recserve(stack, "fade", "set", "tiny", "category", "0", *fade, "--reason", "test", env=env,
                            timeout=120)
            assert run.returncode == 0, run.stdout + run.stderr
            local = LocalRanker.load(package, feature_filter=FadingFilter(
                "tiny", FadingStore(Path(stack.env["RECSERVE_FADE_STORE"])), background=False))
            faded = local.score(batch)
            assert not np.allclose(faded, full, atol=FP16_TOL), "fading category changes these scores"

            def served() -> np.ndarray:
                return client.predict(batch.dense, sparse, unit_ids=batch.unit_ids, timeout=30)

            deadline = time.monotonic() + 30  # the routers poll the store every 0.5 s
            while not np.allclose(served(), faded, atol=FP16_TOL):
                assert time.monotonic() < deadline, "the routers did not follow the fade"
                time.sleep(0.5)
            run = _recserve(stack, "fade", "set", "tiny", "category", "1", *fade, env=env, timeout=120)
            assert run.returncode == 0, run.stdout + run.stderr
            deadline = time.monotonic() + 30
            while not np.allclose(served(), full, atol=FP16_TOL):
                assert time.monotonic() < deadline, "the routers did not follow the fade back"
                time.sleep(0.5)
        down = _recserve(stack, "fade", "status", "--addr", f"127.0.0.1:{free_port()}", env=env, timeout=60)
        assert down.returncode == 1 and "UNAVAILABLE" in down.stderr and "127.0.0.1" in down.stderr, down.stderr
    finally:
        control.send_signal(signal.SIGINT)
        try:
            control.wait(30)
        except subprocess.TimeoutExpired:
            control.kill()
