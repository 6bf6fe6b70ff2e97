"""A shard replica SIGKILLed under steady load: what it costs, and where the recovery time goes
(issue 22 §2).

    .venv/bin/python benchmarks/replica_loss.py --shard-replicas 1,2 --out benchmarks/results/replica-loss

For each ``--shard-replicas`` N: ``recserve serve PACKAGE --shard-replicas N`` (a subprocess),
warm-up, then an open loop at ``--rate`` requests/s with ``--timeout`` deadlines for
``--duration`` s; at ``--kill-at`` s one replica of shard-0 gets SIGKILL. Every OK answer is
checked against the package scored in this process (LocalRanker; float16 on the wire).
Meanwhile, every 0.1 s: shard-0's replica processes (from the OS) and its replica states
(the dashboard's Serve API). Reported per run:

- requests sent / OK / failed by code / wrong scores; failures outside the window
- failure window: first to last failed request (send times, from the kill)
- recovery: the first OK answer after the last failure, from the kill (the issue's target:
  <= 5 s with one replica, 0 failed with two)
- phases, from Serve's controller log (session_dir/logs/serve/controller_*.log) and the
  OS: the controller sees the crash and asks for a replacement; the replacement's worker
  process is created (its start time, from the OS); the controller says it started
  (Serve's own figure: the constructor, reconfigure and first health check, the rest of
  the time being Ray's worker start and the imports of the deployment's code); the
  dashboard says RUNNING

Writes ``replica-loss.md`` and ``replica-loss.json`` under ``--out``. The load average is
printed with every table (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.cpu import processes_titled  # noqa: E402
from loadtest.driver import _CHANNEL_OPTIONS, warm_up  # noqa: E402
from serving.api.wire import PREDICT_METHOD, timeout_metadata  # noqa: E402

WIRE_TOL = 1e-3  # float16 pooled embeddings on the wire against the fp32 in-process scores


class Watch:
    """shard-0's replica pids and RUNNING count every 0.1 s, as (t since the kill, pids, running)."""

    def __init__(self, stack_pid: int, dashboard: str, app: str, deployment: str = "shard-0"):
        self.stack_pid, self.dashboard, self.app, self.deployment = stack_pid, dashboard, app, deployment
        self.samples: list[tuple[float, set[int], int]] = []
        self.born: dict[int, float] = {}  # pid -> process creation (time.time()), first seen
        self.skew = _create_time_skew()
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def pids(self) -> set[int]:
        title = f"ServeReplica:{self.app}:{self.deployment}"
        return {p.pid for p in processes_titled([title], within=self.stack_pid)}

    def running(self) -> int:
        from serving.ops.scaling import ScaleError, replicas, serve_details

        try:
            return sum(r["state"] == "RUNNING" for r in replicas(serve_details(self.dashboard), self.app,
                                                                    self.deployment))
        except (ScaleError, KeyError):
            return -1

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            pids = self.pids()
            for pid in pids - set(self.born):
                try:
                    self.born[pid] = psutil.Process(pid).create_time() - self.skew
                except psutil.Error:
                    pass
            self.samples.append((time.monotonic() - self.t0, pids, self.running()))
            time.sleep(0.1)


def _create_time_skew() -> float:
    """psutil's process creation time minus time.time() at the creation: Linux counts a
    process's start from boot, and the boot time it reports is rounded to the second."""
    import subprocess

    import psutil

    skews = []
    for _ in range(3):
        at = time.time()
        child = subprocess.Popen(["sleep", "0.2"])
        skews.append(psutil.Process(child.pid).create_time() - at)
        child.wait()
    return sorted(skews)[1]


async def send_all(address: str, payloads, rate: float, duration_s: float, timeout_s: float):
    """Open loop, uniform arrivals: (send time, answer time (time.monotonic()), code, scores or the
    error's details) per request, in send order."""
    out: list = [None] * int(rate * duration_s)
    async with grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS) as ch:
        call = ch.unary_unary(PREDICT_METHOD)
        t0 = time.monotonic()

        async def one(i: int) -> None:
            sent = time.monotonic()
            try:
                raw = await call(payloads[i % len(payloads)], timeout=timeout_s, metadata=(timeout_metadata(timeout_s),))
                from recserve.v1 import ranker_pb2

                resp = ranker_pb2.PredictResponse.FromString(raw)
                out[i] = (sent, time.monotonic(), "OK", np.asarray(resp.scores, np.float32))
            except grpc.aio.AioRpcError as e:
                out[i] = (sent, time.monotonic(), e.code().name, e.details())

        tasks = []
        for i in range(len(out)):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return out


_CONTROLLER_LINE = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) controller \d+ -- (.*)$", re.M)


def controller_events(session_dir: str, deployment: str, since: float) -> dict[str, float | int | None]:
    """The replacement's start-up from Serve's controller log, wall-clock times (time.time())
    at or after ``since``: crash seen, replacement asked for, started (with its PID and
    Serve's "constructor, reconfigure method, and initial health check" seconds)."""
    from datetime import datetime

    ours = f"deployment='{deployment}'"
    out: dict[str, float | int | None] = {"crash seen": None, "replacement asked": None, "started": None,
                                          "pid": None, "constructor and first health check": None}
    for path in Path(session_dir, "logs", "serve").glob("controller_*.log"):
        for m in _CONTROLLER_LINE.finditer(path.read_text(errors="replace")):
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the log's local time
            text = m.group(2)
            if at < since or ours not in text:
                continue
            if out["crash seen"] is None and "crashed" in text:
                out["crash seen"] = at
            elif out["replacement asked"] is None and text.startswith("Starting Replica("):
                out["replacement asked"] = at
            elif out["started"] is None and "started successfully" in text:
                started = re.search(r"\(PID: (\d+)\).*took ([\d.]+)s", text)
                out["started"] = at
                if started:
                    out["pid"], out["constructor and first health check"] = int(started.group(1)), float(started.group(2))
    return out


def run_one(package: Path, replicas: int, args, trace, expected) -> dict:
    from loadtest.targets import ServeStack
    from serving.ops.scaling import app_of, serve_details

    state = Path(tempfile.mkdtemp(prefix="replica-loss-"))
    extra = ("--shard-replicas", str(replicas), *args.serve_arg)
    with ServeStack(package, name=f"kill-{replicas}", log_dir=args.out, extra_args=extra,
                    env={"RECSERVE_ARTIFACTS": str(state)}) as stack:
        deadline = time.monotonic() + 120  # written once the stack is up (gRPC may answer a moment earlier)
        while not (state / "serving.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        info = json.loads((state / "serving.json").read_text())
        app = app_of(serve_details(info["dashboard"]), "shard-0")
        watch = Watch(stack.proc.pid, info["dashboard"], app)
        deadline = time.monotonic() + 120
        while len(watch.pids()) < replicas and time.monotonic() < deadline:
            time.sleep(0.5)
        before = watch.pids()
        assert len(before) == replicas, f"shard-0 has {len(before)} replica processes, expected {replicas}"
        asyncio.run(warm_up(stack.address, trace.payloads, 20))
        load = threading.Thread(target=lambda: results.append(asyncio.run(
            send_all(stack.address, trace.payloads, args.rate, args.duration, args.timeout))))
        results: list = []
        load.start()
        time.sleep(args.kill_at)
        victim = min(before)
        watch.t0 = kill_mono = time.monotonic()
        kill_wall = time.time()
        os.kill(victim, signal.SIGKILL)
        watch.thread.start()
        load.join()
        time.sleep(max(0.0, args.settle - (time.monotonic() - kill_mono)))
        watch.stop.set()
        watch.thread.join()
        events = controller_events(info["session_dir"], "shard-0", kill_wall - 1.0)
    rows = results[0]
    offset = kill_mono  # every time below: seconds from the kill
    codes: dict[str, int] = {}
    wrong = 0
    failed_sent = []
    ok_answered = []
    for i, (sent, answered, code, payload) in enumerate(rows):
        codes[code] = codes.get(code, 0) + 1
        if code == "OK":
            if not np.allclose(payload, expected[i % len(expected)], atol=WIRE_TOL):
                wrong += 1
            ok_answered.append(answered - offset)
        else:
            failed_sent.append(sent - offset)
    failures = sorted(failed_sent)
    last_failure = failures[-1] if failures else None
    recovery = min((t for t in ok_answered if last_failure is not None and t > last_failure), default=None)
    phases: dict[str, float | None] = {"gone from RUNNING": None, "new process": None, "RUNNING again": None}
    for t, pids, running in watch.samples:
        if phases["gone from RUNNING"] is None and 0 <= running < replicas:
            phases["gone from RUNNING"] = t
        if phases["new process"] is None and pids - before:
            phases["new process"] = t
        if phases["gone from RUNNING"] is not None and phases["RUNNING again"] is None and running == replicas:
            phases["RUNNING again"] = t
    # the replacement's start-up, from the kill (wall clock): Serve's controller log and the OS
    def since_kill(at):
        return None if at is None else at - kill_wall

    start_up = {"crash seen": since_kill(events["crash seen"]),
                "replacement asked": since_kill(events["replacement asked"]),
                "worker process created": since_kill(watch.born.get(events["pid"])),
                "started (controller)": since_kill(events["started"]),
                "constructor and first health check": events["constructor and first health check"]}
    return {
        "shard_replicas": replicas, "sent": len(rows), "codes": codes, "wrong_scores": wrong,
        "failed": len(failures), "failure_window_s": [failures[0], failures[-1]] if failures else None,
        "recovery_s": recovery, "phases_s": phases,
        "new_replica_start_up_s": start_up,
        "load_average": os.getloadavg(), "rate": args.rate, "timeout_s": args.timeout, "duration_s": args.duration,
        "kill_at_s": args.kill_at,
    }


def fmt(x, unit: str = " s") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def report(runs: list[dict], args, package: Path) -> str:
    lines = [
        f"### shard-0 replica SIGKILLed at t={args.kill_at:g} s of {args.duration:g} s, open loop {args.rate:g} req/s, "
        f"{args.timeout:g} s deadlines ({package.name})",
        "",
        "| shard replicas | sent | OK | failed (codes) | wrong | failure window after the kill | recovery (first OK "
        "after the last failure) | controller: crash seen / replacement asked | its worker process created | "
        "controller: started (constructor + first health check) | RUNNING again | load avg (1 min) |",
        "| ---: | ---: | ---: | --- | ---: | --- | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for r in runs:
        p = r["phases_s"]
        fails = {k: v for k, v in r["codes"].items() if k != "OK"}
        window = "-" if not r["failure_window_s"] else f"{r['failure_window_s'][0]:.2f} .. {r['failure_window_s'][1]:.2f} s"
        su = r["new_replica_start_up_s"] or {}
        seen = f"{fmt(su.get('crash seen'), '')} / {fmt(su.get('replacement asked'))}"
        started = f"{fmt(su.get('started (controller)'))} ({fmt(su.get('constructor and first health check'))})"
        lines.append(
            f"| {r['shard_replicas']} | {r['sent']} | {r['codes'].get('OK', 0)} | {r['failed']} {fails or ''} | "
            f"{r['wrong_scores']} | {window} | {fmt(r['recovery_s'])} | {seen} | "
            f"{fmt(su.get('worker process created'))} | {started} | {fmt(p['RUNNING again'])} | "
            f"{r['load_average'][0]:.1f} |")
    lines += ["", "Times in seconds from the kill (wall clock). From the replacement asked for to its worker "
              "process: Ray's raylet starting a worker; from there to started: Python and Ray's worker start-up, "
              "the imports of the deployment's code (torch, Ray Serve) and, in brackets, Serve's own figure for "
              "the constructor (package opened, tables loaded), reconfigure and first health check; RUNNING "
              "again: the dashboard's Serve API, polled every 0.1 s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", default="default")
    p.add_argument("--shard-replicas", default="1,2", help="comma-separated replica counts, one run each")
    p.add_argument("--rate", type=float, default=8.0, help="requests/s (open loop)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load per run")
    p.add_argument("--kill-at", type=float, default=10.0, help="seconds into the load")
    p.add_argument("--settle", type=float, default=40.0, help="seconds after the kill the watch keeps sampling")
    p.add_argument("--timeout", type=float, default=1.0, help="each request's deadline, s")
    p.add_argument("--requests", type=int, default=64, help="distinct requests in the trace")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replica-loss")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for recserve serve")
    p.add_argument("--from-json", type=Path, default=None, help="only print the table of a earlier run's JSON")
    args = p.parse_args(argv)
    if args.from_json:
        print(report(json.loads(args.from_json.read_text()), args, Path(args.package)), end="")
        return 0
    if not 0 < args.kill_at < args.duration:
        p.error("--kill-at: must be inside the run")

    from loadtest.trace import make_trace
    from recserve.default_package import resolve_package
    from recserve.package import ModelPackage
    from serving.engine.local_ranker import LocalRanker

    package = resolve_package(args.package)
    trace = make_trace(ModelPackage.open(package).manifest.workload, args.requests, seed=3)
    ranker = LocalRanker.load(package)
    expected = [ranker.score(b) for b in trace.batches]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in (int(x) for x in args.shard_replicas.split(",")):
        print(f"shard replicas {n}: starting the stack ...", flush=True)
        runs.append(run_one(package, n, args, trace, expected))
        print(report(runs[-1:], args, package), flush=True)
    text = report(runs, args, package)
    print(text)
    (args.out / "replica-loss.md").write_text(text)
    (args.out / "replica-loss.json").write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
