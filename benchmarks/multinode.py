"""Past one machine (issue 21): a package served over several Ray nodes on this machine.

Each node is a raylet of its own (``ray.cluster_utils.Cluster``: its own object store, so
pooled embeddings cross nodes through Ray's object manager as between hosts), labelled
``recserve-host=hK`` with a Ray ``memory`` budget for shards. The head, h0, has no budget: it
holds the router and the tower, so every shard call crosses nodes.

    # refused on one shard host (the message names the table), then served on two: where each
    # replica runs and sampled scores against the single-process reference (LocalRanker)
    python benchmarks/multinode.py check --package PKG --out DIR

    # the node holding a shard's only replica removed under load; then two replicas on two nodes
    python benchmarks/multinode.py nodeloss --package PKG --out benchmarks/results/multinode

Both deploy with ``recserve serve --address HEAD --place-on-hosts`` as a user would (a
subprocess), and stop everything they start (the serve process, then the cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = "recserve"  # the app `recserve serve` deploys
HEAD_HOST = "h0"


# ---- a multi-node Ray on this machine ------------------------------------------------------------

@contextmanager
def local_cluster(*, shard_hosts: int, host_memory: int, num_cpus: int = 1):
    """A head node (h0: router and tower, no shard budget) and ``shard_hosts`` nodes h1.. with
    ``host_memory`` bytes of Ray memory each; yields the Cluster. Shut down on exit."""
    from serving.ops.loopback import ray_on_loopback

    ray_on_loopback()  # nodes on 127.0.0.1: this machine's other address may not be reachable
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "num_cpus": num_cpus, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "include_dashboard": False, "labels": {"recserve-host": HEAD_HOST}, "memory": 1})
    try:
        for k in range(1, shard_hosts + 1):
            add_host(cluster, f"h{k}", host_memory, num_cpus=num_cpus)
        yield cluster
    finally:
        cluster.shutdown()


def add_host(cluster, name: str, memory: int, *, num_cpus: int = 1):
    return cluster.add_node(node_ip_address="127.0.0.1", num_cpus=num_cpus, object_store_memory=80 * 2**20,
                            labels={"recserve-host": name}, memory=memory)


def host_node(cluster, name: str):
    """The cluster's Node labelled ``name``."""
    for node in cluster.worker_nodes:
        if node._ray_params.labels.get("recserve-host") == name:
            return node
    raise KeyError(name)


class ServeProcess:
    """``recserve serve PKG --address HEAD --place-on-hosts ...`` as a subprocess (run through
    ``prefix``, e.g. ``ip netns exec NS``); its output goes to ``log``."""

    def __init__(self, package: Path, address: str, port: int, log: Path, *extra: str, prefix: tuple = ()):
        from serving.ops.ports import free_port

        self.log_path = log
        self.log = open(log, "w")
        cmd = [*prefix, sys.executable, "-m", "recserve.cli", "serve", str(package), "--address", address,
               "--port", str(port), "--http-port", str(free_port()), "--place-on-hosts",
               "--router-host", HEAD_HOST, "--tower-host", HEAD_HOST, "--feature-filter", "none", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "recserve: serving" in self.log_path.read_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"recserve serve exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"recserve serve not serving after {timeout_s} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def connect(cluster) -> None:
    import ray

    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)


# ---- check: refused on one host, served on two, scores against the reference ---------------------

def run_check(args: argparse.Namespace) -> dict:
    import numpy as np
    import ray

    from loadtest.trace import make_trace
    from recserve.package import ModelPackage
    from recserve.v1 import ranker_pb2
    from serving.api.client import RankingClient
    from serving.engine.local_ranker import LocalRanker
    from serving.app.nodes import replica_nodes
    from serving.ops.ports import free_port

    manifest = ModelPackage.open(args.package).manifest
    trace = make_trace(manifest.workload, args.requests, seed=args.seed)
    shard_bytes = [sh.bytes for sh in manifest.plan.shards]
    # a host budget that holds the largest shard but not the package
    memory = args.host_memory or max(shard_bytes) + (sum(shard_bytes) - max(shard_bytes)) // 2
    result: dict = {"package": str(args.package), "shards": len(shard_bytes), "shard_bytes": shard_bytes,
                    "host_memory": memory, "problems": []}
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with local_cluster(shard_hosts=1, host_memory=memory) as cluster:
        print(f"cluster of 2 nodes after {time.perf_counter() - started:.1f} s", flush=True)
        one = ServeProcess(args.package, cluster.address, free_port(), args.out / "serve-one-host.log")
        code = one.proc.wait(args.timeout)
        one.stop()
        refusal = [line for line in one.output().splitlines() if "cannot place" in line]
        result["one_host"] = {"exit_code": code, "message": refusal[0] if refusal else one.output()[-2000:]}
        if code != 2 or not refusal:
            result["problems"].append(f"one shard host: expected a refusal (exit 2), got exit {code}")
        for k in range(2, args.hosts + 1):
            add_host(cluster, f"h{k}", memory)
        print(f"{args.hosts} shard hosts after {time.perf_counter() - started:.1f} s", flush=True)
        port = free_port()
        serve = ServeProcess(args.package, cluster.address, port, args.out / "serve.log")
        try:
            serve.wait_serving(args.timeout)
            print(f"serving after {time.perf_counter() - started:.1f} s", flush=True)
            with RankingClient(f"127.0.0.1:{port}") as client:
                client.wait_until_serving(manifest.name, manifest.version, timeout=args.timeout)
                served = [np.asarray(client.predict_raw(ranker_pb2.PredictRequest.FromString(p),
                                                        timeout=args.timeout).scores, np.float32)
                          for p in trace.payloads]
            connect(cluster)
            try:
                result["placement"] = replica_nodes(APP)
            finally:
                ray.shutdown()
        finally:
            result["serve_exit_code"] = serve.stop()
    reference = LocalRanker.load(args.package, device="cpu")
    diffs = [float(np.max(np.abs(s - reference.score(b)))) for s, b in zip(served, trace.batches)]
    result.update(requests=len(served), examples=int(sum(len(s) for s in served)),
                  max_abs_diff=max(diffs, default=0.0), tolerance=args.tolerance,
                  seconds=round(time.perf_counter() - started, 1))
    if result["max_abs_diff"] > args.tolerance:
        result["problems"].append(f"scores differ from LocalRanker by up to {result['max_abs_diff']:.3g}")
    result["problems"] += placement_problems(result["placement"], shards=len(shard_bytes))
    return result


def placement_problems(placement: dict[str, list[dict]], *, shards: int) -> list[str]:
    """What is wrong with ``placement`` (serving.app.nodes.replica_nodes): router and tower off the
    head, a shard with no replica or one on the head, or two shards' replicas... [] when fine."""
    problems = []
    for name in ("Router", "DenseTower"):
        hosts = [r["host"] for r in placement.get(name, [])]
        if hosts != [HEAD_HOST]:
            problems.append(f"{name}: expected one replica on {HEAD_HOST}, found on {hosts}")
    for k in range(shards):
        hosts = [r["host"] for r in placement.get(f"shard-{k}", [])]
        if not hosts or HEAD_HOST in hosts:
            problems.append(f"shard-{k}: expected replicas on shard hosts, found on {hosts}")
    return problems


# ---- nodeloss: the node of a shard removed while clients send ------------------------------------

@dataclass
class Outcome:
    start: float  # s since the load began
    end: float
    code: str  # OK, WRONG, or the gRPC code
    details: str = ""


def closed_loop(client, batches, expected, *, seconds: float, max_requests: int, concurrency: int,
                timeout_s: float, tolerance: float, t0: float, on_tick=None) -> list[Outcome]:
    """``concurrency`` threads send the sampled requests back to back for ``seconds`` (at most
    ``max_requests`` in all); every answer is checked against ``expected``."""
    import threading

    import grpc
    import numpy as np

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(w: int) -> None:
        i = w
        while time.monotonic() < stop_at:
            with lock:
                if len(outcomes) >= max_requests:
                    return
            k = i % len(batches)
            i += concurrency
            start = time.monotonic()
            try:
                got = client.predict(batches[k].dense, as_sparse(batches[k]), timeout=timeout_s)
                ok = np.allclose(got, expected[k], atol=tolerance)
                outcome = Outcome(start - t0, time.monotonic() - t0, "OK" if ok else "WRONG")
            except grpc.RpcError as e:
                outcome = Outcome(start - t0, time.monotonic() - t0, e.code().name, e.details() or "")
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if on_tick is not None:
            on_tick()
        time.sleep(0.1)
    return sorted(outcomes, key=lambda o: o.start)


def as_sparse(batch) -> dict:
    return {f: (b.values, b.lengths) if b.weights is None else (b.values, b.lengths, b.weights)
            for f, b in batch.sparse.items()}


def loss_summary(outcomes: list[Outcome], kill_at: float, timeout_s: float) -> dict:
    """Failed % and codes, wrong scores, the longest failed call, and the recovery time: from the
    removal to the end of the last failed request (0 when none failed)."""
    failed = [o for o in outcomes if o.code not in ("OK", "WRONG")]
    after = [o for o in outcomes if o.start >= kill_at]
    last_fail = max((o.end for o in failed), default=None)
    recovered_ok = [o for o in outcomes if last_fail is not None and o.start > last_fail and o.code == "OK"]
    codes: dict[str, int] = {}
    for o in failed:
        codes[o.code] = codes.get(o.code, 0) + 1
    return {
        "requests": len(outcomes), "ok": sum(o.code == "OK" for o in outcomes),
        "wrong": sum(o.code == "WRONG" for o in outcomes), "failed": len(failed),
        "failed_pct": 100.0 * len(failed) / max(len(outcomes), 1),
        "failed_pct_after_removal": 100.0 * len(failed) / max(len(after), 1),
        "codes": codes, "messages": sorted({o.details[:200] for o in failed})[:5],
        "longest_failed_call_s": max((o.end - o.start for o in failed), default=0.0),
        "past_deadline": sum(o.end - o.start > timeout_s + 1.0 for o in outcomes),
        "recovery_s": 0.0 if last_fail is None else last_fail - kill_at,
        "recovered": last_fail is None or bool(recovered_ok),
        "ok_per_s": sum(o.code == "OK" for o in outcomes) / max(max((o.end for o in outcomes), default=1.0), 1e-9),
    }


def run_nodeloss_case(args: argparse.Namespace, replicas: int) -> dict:
    """One run: serve with ``replicas`` per shard over 3 shard hosts, remove the host of shard-0's
    (first) replica after --warm-s of load, keep sending; where shard-0 runs afterwards."""
    import ray

    from loadtest.trace import make_trace
    from recserve.package import ModelPackage
    from serving.api.client import RankingClient
    from serving.engine.local_ranker import LocalRanker
    from serving.app.nodes import replica_nodes
    from serving.ops.ports import free_port

    manifest = ModelPackage.open(args.package).manifest
    trace = make_trace(manifest.workload, args.batches, seed=args.seed)
    reference = LocalRanker.load(args.package, device="cpu")
    expected = [reference.score(b) for b in trace.batches]
    memory = 2 * sum(sh.bytes for sh in manifest.plan.shards)  # room for every shard on every host
    started = time.perf_counter()
    with local_cluster(shard_hosts=3, host_memory=memory) as cluster:
        port = free_port()
        serve = ServeProcess(args.package, cluster.address, port, args.out / f"serve-replicas{replicas}.log",
                             "--shard-replicas", str(replicas), "--default-timeout-s", str(args.timeout_s))
        try:
            serve.wait_serving(args.serve_timeout)
            connect(cluster)
            before = replica_nodes(APP)
            victim_host = before["shard-0"][0]["host"]
            victim = host_node(cluster, victim_host)
            print(f"serving after {time.perf_counter() - started:.1f} s; shard hosts "
                  f"{ {k: [r['host'] for r in v] for k, v in before.items()} }; removing {victim_host} "
                  f"after {args.warm_s} s of load", flush=True)
            t0 = time.monotonic()
            removed: list[float] = []

            def tick() -> None:
                if not removed and time.monotonic() - t0 >= args.warm_s:
                    removed.append(time.monotonic() - t0)
                    cluster.remove_node(victim, allow_graceful=False)

            with RankingClient(f"127.0.0.1:{port}") as client:
                client.wait_until_serving(manifest.name, manifest.version, timeout=args.serve_timeout)
                outcomes = closed_loop(client, trace.batches, expected, seconds=args.seconds,
                                       max_requests=args.max_requests, concurrency=args.concurrency,
                                       timeout_s=args.timeout_s, tolerance=args.tolerance, t0=t0, on_tick=tick)
            after = replica_nodes(APP)
            ray.shutdown()
        finally:
            serve.stop()
    summary = loss_summary(outcomes, removed[0], args.timeout_s)
    return {"replicas_per_shard": replicas, "removed_host": victim_host, "removed_at_s": removed[0],
            "shard0_hosts_before": [r["host"] for r in before["shard-0"]],
            "shard0_hosts_after": [r["host"] for r in after.get("shard-0", [])], **summary,
            "timeline": [[round(o.start, 3), round(o.end, 3), o.code] for o in outcomes]}


def nodeloss_table(results: list[dict]) -> str:
    lines = ["| replicas per shard | requests | failed % | wrong | codes | recovery s | longest failed call s | "
             "shard-0 hosts before -> after | ok/s |", "|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in results:
        codes = ", ".join(f"{k} {v}" for k, v in r["codes"].items()) or "-"
        lines.append(f"| {r['replicas_per_shard']} | {r['requests']} | {r['failed_pct']:.2f} | {r['wrong']} | {codes} | "
                     f"{r['recovery_s']:.1f} | {r['longest_failed_call_s']:.2f} | "
                     f"{','.join(r['shard0_hosts_before'])} -> {','.join(r['shard0_hosts_after']) or 'none'} | "
                     f"{r['ok_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/multinode.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="refused on one host, served on several: placement and scores")
    c.add_argument("--package", type=Path, required=True)
    c.add_argument("--hosts", type=int, default=2, help="shard hosts to serve on (besides the head)")
    c.add_argument("--host-memory", type=int, default=0,
                   help="Ray memory of a shard host, bytes (0: the largest shard plus half the rest)")
    c.add_argument("--requests", type=int, default=4)
    c.add_argument("--tolerance", type=float, default=2e-3, help="max |served - reference| (fp16 wire)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--timeout", type=float, default=240.0)
    c.add_argument("--out", type=Path, required=True)
    n = sub.add_parser("nodeloss", help="the node of a shard removed under load, 1 and 2 replicas per shard")
    n.add_argument("--package", type=Path, required=True)
    n.add_argument("--replicas", default="1,2", help="replicas per shard of each run")
    n.add_argument("--batches", type=int, default=16, help="distinct sampled requests (8 examples each)")
    n.add_argument("--concurrency", type=int, default=4, help="closed-loop client threads")
    n.add_argument("--seconds", type=float, default=45.0, help="load per run (bounded also by --max-requests)")
    n.add_argument("--max-requests", type=int, default=20_000)
    n.add_argument("--warm-s", type=float, default=5.0, help="load before the node is removed")
    n.add_argument("--timeout-s", type=float, default=3.0, help="each request's deadline")
    n.add_argument("--tolerance", type=float, default=2e-3)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--serve-timeout", type=float, default=300.0)
    n.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "nodeloss":
        args.out.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()
        results = [run_nodeloss_case(args, int(r)) for r in args.replicas.split(",")]
        table = nodeloss_table(results)
        header = (f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores, shared)")
        print(table + "\n" + header)
        (args.out / "nodeloss.md").write_text(table + "\n\n" + header + "\n")
        (args.out / "nodeloss.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "load": header, "results": results}, indent=1) + "\n")
        return 0
    if args.command == "check":
        result = run_check(args)
        text = json.dumps(result, indent=1)
        print(text)
        (args.out / "check.json").write_text(text + "\n")
        return 1 if result["problems"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
