"""A version swap as an operator runs it, under load (issue 22 §3): `recserve serve v1`, then from
other processes `recserve deploy v2`, a corrupt package (refused), and `recserve deploy v3`, while
an open-loop caller sends requests with deadlines. Every OK answer is checked against the
in-process model of the version it names (serving/engine/local_ranker.py), so a mixed or wrong
answer is counted, not just a failed one.

    RAY_AUTH_MODE=token .venv/bin/python benchmarks/swap.py --out benchmarks/results/swap-shared

The packages: criteo-kaggle with seeded random weights (`recserve export --init random`, tables
capped at ``--max-rows``), one seed per version, 2 shards; the corrupt one is v2 with bytes
appended to a shard file. The stack: `recserve serve` with its defaults, the fading filter included
(``--serve-arg`` adds flags), started and stopped as the bench's stacks are (loadtest/targets.py). Writes ``swap.md`` (a table per phase and one per command), ``swap.json`` and
``swap.png`` (each request's latency against time, coloured by the version that answered, the
commands' spans shaded) under ``--out``. The CPU of every process of the stack and of the deploy
commands is sampled every 0.25 s and averaged per phase by group (the serving replicas by version,
Serve's controller, Ray's own processes, workers still starting), so a phase's latency can be put
beside what ran on the cores meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.cpu import cpu_by_process, process_tree  # noqa: E402
from loadtest.stats import percentiles_ms  # noqa: E402
from loadtest.targets import ServeStack  # noqa: E402
from recserve.cli.serve import FADING_FILTER  # noqa: E402

TOL = 1e-3  # float16 pooled embeddings on the wire (the default) against the float32 model


@dataclass
class Outcome:
    sent_s: float  # since the load started
    latency_ms: float  # from its scheduled send time: the load generator's own lag counted
    code: str  # OK or the gRPC status name
    service_ms: float = 0.0  # from its actual send: the stack's time alone (what its deadline counts)
    version: str = ""
    right: bool = True  # scores equal the named version's model


@dataclass
class Command:
    name: str
    argv: list
    start_s: float = 0.0
    end_s: float = 0.0
    returncode: int | None = None
    tail: str = ""
    lines: list = field(default_factory=list)  # (s on the load's clock, a line it printed)


@dataclass
class Run:
    outcomes: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    cpu: list = field(default_factory=list)  # (s on the load's clock, {process group: % of one core})


# what each process of the stack is, for the CPU table (first match of its command line)
_GROUPS = (("Router", "Router"), ("ServeController", "Serve controller"), ("ProxyActor", "Serve proxy"),
           ("gcs_server", "Ray GCS"), ("raylet", "raylet"), ("RuntimeEnvAgent", "runtime-env agent"),
           ("runtime_env", "runtime-env agent"), ("Agent", "dashboard agent"), ("dashboard", "Ray dashboard"),
           ("recserve.cli deploy", "recserve deploy"), ("recserve.cli serve", "recserve serve"))


def _group(cmdline: str) -> str:
    if "ServeReplica:recserve@" in cmdline:  # a version's shard or tower: by version
        return "replicas of " + cmdline.split("ServeReplica:recserve@", 1)[1].split(":", 1)[0]
    for key, name in _GROUPS:
        if key in cmdline:
            return name
    return "other Ray workers (starting: ray::IDLE, setup)"


def _sample_cpu(started: float, stop: threading.Event, run: Run, period_s: float = 0.25) -> None:
    """Every ``period_s``: each group's CPU over the period, in % of one core, over this process's
    descendants: the stack (``recserve serve`` and the Ray it started) and the deploy commands."""
    me, last = os.getpid(), {}
    while not stop.wait(period_s):
        now = {pid: (_group(title), cpu) for pid, (title, cpu) in cpu_by_process(process_tree(me)[1:]).items()}
        groups: dict[str, float] = {}
        for pid, (group, cpu) in now.items():
            if pid in last:
                groups[group] = groups.get(group, 0.0) + (cpu - last[pid][1]) / period_s * 100
        last = now
        if groups:
            run.cpu.append((round(time.monotonic() - started, 2), {g: round(v, 1) for g, v in groups.items()}))


def _export(workload: str, max_rows: int, seed: int, version: str, out: Path) -> Path:
    if (out / "manifest.json").exists():
        return out
    run = subprocess.run([sys.executable, "-m", "recserve.cli", "export", "--workload", workload,
                          "--max-rows", str(max_rows), "--init", "random", "--seed", str(seed), "--out", str(out),
                          "--strategy", "load", "--shards", "2", "--name", "swap-bench", "--model-version", version],
                         cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"export of {version} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    print(f"  packaged {version} -> {out}", flush=True)
    return out


def _load(address: str, requests: list, expected: dict, rate: float, stop: threading.Event, run: Run,
          timeout_s: float, started: float) -> None:
    """Open loop at ``rate`` req/s (loadtest/driver.py: evenly spaced, over its 8 connections,
    latency from each request's scheduled time) until ``stop``; every OK answer is checked
    against the model of the version it names."""
    from loadtest.driver import open_loop
    from recserve.v1 import ranker_pb2

    payloads = [message.SerializeToString() for message, _ in requests]
    begun = time.monotonic() - started  # on the load's clock (``started``: time.monotonic()), as the commands
    record = asyncio.run(open_loop(address, payloads, rate=rate, duration_s=3600.0, max_requests=int(rate * 3600) + 1,
                                   timeout_s=timeout_s, arrivals="uniform", keep_responses=True,
                                   until=stop.is_set))
    for sent, latency, service, code, k, answer in zip(record.scheduled_s, record.latency_s, record.service_s,
                                                       record.codes, record.trace_index, record.responses):
        out = Outcome(begun + float(sent), float(latency) * 1000, code, service_ms=float(service) * 1000)
        if code == "OK":
            reply = ranker_pb2.PredictResponse.FromString(answer)
            out.version = reply.version
            want = expected.get((reply.version, requests[k][1]))
            got = np.asarray(reply.scores, dtype=np.float32)
            out.right = want is not None and got.shape == want.shape and bool(np.allclose(got, want, atol=TOL))
        run.outcomes.append(out)


def _phases(run: Run) -> list[tuple[str, float, float]]:
    """(name, from, to) on the load's clock: before, each command's span, and between them."""
    out, t = [], 0.0
    for c in run.commands:
        out.append((f"before {c.name}" if t == 0.0 else "between", t, c.start_s))
        out.append((c.name, c.start_s, c.end_s))
        t = c.end_s
    out.append(("after", t, float("inf")))
    return out


def _summary(rows: list[Outcome]) -> dict:
    ok = [r for r in rows if r.code == "OK"]
    p50, p99 = percentiles_ms(np.array([r.latency_ms for r in ok]) / 1000, (50, 99))
    (p99_service,) = percentiles_ms(np.array([r.service_ms for r in ok]) / 1000, (99,))
    codes: dict[str, int] = {}
    for r in rows:
        if r.code != "OK":
            codes[r.code] = codes.get(r.code, 0) + 1
    return {"sent": len(rows), "ok": len(ok), "failed": codes, "wrong": sum(not r.right for r in ok),
            "versions": sorted({r.version for r in ok}), "p50_ms": p50, "p99_ms": p99,
            "p99_service_ms": p99_service}


def _report(run: Run, out: Path, header: str) -> str:
    lines = [header, "", "| phase | from s | to s | sent | OK | failed | wrong | versions answering | P50 / P99 ms "
             "| P99 from the actual send ms |", "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |"]
    for name, lo, hi in _phases(run):
        s = _summary([r for r in run.outcomes if lo <= r.sent_s < hi])
        hi_text = "end" if hi == float("inf") else f"{hi:.1f}"
        lines.append(f"| {name} | {lo:.1f} | {hi_text} | {s['sent']} | {s['ok']} | {s['failed'] or '-'} | {s['wrong']} | "
                     f"{', '.join(s['versions']) or '-'} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | {s['p99_service_ms']:.1f} |")
    total = _summary(run.outcomes)
    lines.append(f"| **all** | | | {total['sent']} | {total['ok']} | {total['failed'] or '-'} | {total['wrong']} | "
                 f"{', '.join(total['versions'])} | {total['p50_ms']:.1f} / {total['p99_ms']:.1f} | "
                 f"{total['p99_service_ms']:.1f} |")
    lines += ["", "| command | took s | exit | its last line |", "| --- | ---: | ---: | --- |"]
    for c in run.commands:
        last = (c.tail.strip().splitlines() or [""])[-1].replace("|", "/")[:160]
        lines.append(f"| `{c.name}` | {c.end_s - c.start_s:.1f} | {c.returncode} | {last} |")
    groups = sorted({g for _, sample in run.cpu for g in sample})
    if groups:
        lines += ["", "Mean CPU per phase, % of one core (2 cores = 200%), sampled every 0.25 s:", "",
                  "| phase | " + " | ".join(groups) + " | all |", "| --- |" + " ---: |" * (len(groups) + 1)]
        for name, lo, hi in _phases(run):
            samples = [sample for t, sample in run.cpu if lo <= t < hi]
            if not samples:
                continue
            means = [sum(smp.get(g, 0.0) for smp in samples) / len(samples) for g in groups]
            lines.append(f"| {name} | " + " | ".join(f"{m:.0f}" for m in means) + f" | {sum(means):.0f} |")
    for c in run.commands:
        steps = [f"{t:.1f} {line}" for t, line in c.lines if line.startswith("recserve deploy:")]
        lines += ["", f"`{c.name}`'s steps (s on the load's clock):", "", *(f"    {step}" for step in steps)]
    text = "\n".join(lines) + "\n"
    (out / "swap.md").write_text(text)
    (out / "swap.json").write_text(json.dumps({"outcomes": [asdict(o) for o in run.outcomes],
                                               "commands": [asdict(c) for c in run.commands], "cpu": run.cpu}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 4))
        for c in run.commands:
            ax.axvspan(c.start_s, c.end_s, alpha=0.15, color="red" if c.returncode else "grey")
            ax.text(c.start_s, 1, c.name, fontsize=7, rotation=90, va="bottom", transform=ax.get_xaxis_transform())
        for version in sorted({r.version for r in run.outcomes if r.code == "OK"}):
            rows = [r for r in run.outcomes if r.code == "OK" and r.version == version]
            ax.scatter([r.sent_s for r in rows], [r.latency_ms for r in rows], s=4, label=version)
        failed = [r for r in run.outcomes if r.code != "OK"]
        if failed:
            ax.scatter([r.sent_s for r in failed], [r.latency_ms for r in failed], s=12, marker="x", c="k",
                       label="failed")
        ax.set_xlabel("s since the load started")
        ax.set_ylabel("latency ms")
        ax.set_yscale("log")
        ax.legend(loc="upper right", markerscale=3)
        fig.tight_layout()
        fig.savefig(out / "swap.png", dpi=120)
    except ImportError:
        pass
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workload", default="criteo-kaggle")
    ap.add_argument("--max-rows", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second, open loop")
    ap.add_argument("--batch", type=int, default=64, help="examples per request")
    ap.add_argument("--timeout", type=float, default=1.0, help="each request's deadline, s")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of load before, between and after")
    ap.add_argument("--serve-arg", action="append", default=[], help="one more `recserve serve` flag")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "packages"
    print("packages ...", flush=True)
    packages = {v: _export(args.workload, args.max_rows, seed, v, work / v)
                for v, seed in (("v1", 1), ("v2", 2), ("v3", 3))}
    bad = work / "v2-corrupt"
    if not bad.exists():
        shutil.copytree(packages["v2"], bad)
        with open(bad / "shards" / "shard-1.safetensors", "ab") as f:
            f.write(b"corrupt")

    from recserve.package import ModelPackage
    from recserve.synth import TrafficGenerator
    from serving.api.codec import encode_request
    from serving.engine.local_ranker import LocalRanker

    workload = ModelPackage.open(str(packages["v1"])).manifest.workload
    batches = [TrafficGenerator(workload, seed=100 + i).batch(args.batch) for i in range(16)]
    requests = []
    for i, b in enumerate(batches):
        requests.append((encode_request(b.dense, {f: (x.values, x.lengths) for f, x in b.sparse.items()},
                                        model="swap-bench"), i))
    expected = {}
    for v, pkg in packages.items():
        ranker = LocalRanker.load(str(pkg))
        for i, b in enumerate(batches):
            expected[(v, i)] = ranker.score(b)

    state = out / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    # `recserve deploy` finds the stack through the state file under RECSERVE_ARTIFACTS; Ray's own
    # metrics report interval (10 s) and recserve serve's own feature filter (fading), as a user runs it
    env = {"RECSERVE_ARTIFACTS": str(state), "RAY_metrics_report_interval_ms": "10000"}
    serve_args = tuple(args.serve_arg)
    if not any(a.startswith("--feature-filter") for a in serve_args):
        serve_args += ("--feature-filter", FADING_FILTER)
    run, stop = Run(), threading.Event()
    print("recserve serve v1 ...", flush=True)
    with ServeStack(packages["v1"], name="swap", log_dir=out, env=env, extra_args=serve_args,
                    ready_timeout_s=600) as stack:
        deploy_env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONPATH=str(ROOT), **env)
        started = time.monotonic()
        load = threading.Thread(target=_load, args=(stack.address, requests, expected, args.rate, stop, run,
                                                    args.timeout, started))
        load.start()
        sampler = threading.Thread(target=_sample_cpu, args=(started, stop, run), daemon=True)
        sampler.start()
        try:
            steps = [("deploy v2", packages["v2"]), ("deploy v2-corrupt", bad), ("deploy v3", packages["v3"])]
            for name, pkg in steps:
                time.sleep(args.settle)
                command = Command(name, [sys.executable, "-m", "recserve.cli", "deploy", str(pkg)])
                print(f"{name} ...", flush=True)
                command.start_s = time.monotonic() - started
                with subprocess.Popen(command.argv, cwd=ROOT, env=deploy_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) as proc:
                    for line in proc.stdout:  # each step's time, to line up with the load's
                        command.lines.append((round(time.monotonic() - started, 2), line.rstrip()))
                command.end_s = time.monotonic() - started
                command.returncode = proc.returncode
                command.tail = "\n".join(line for _, line in command.lines)[-4000:]
                run.commands.append(command)
                print(f"  exit {proc.returncode} after {command.end_s - command.start_s:.1f} s", flush=True)
            time.sleep(args.settle)
        finally:
            stop.set()
            load.join()
    header = (f"### `recserve serve` v1, then `recserve deploy` v2, a corrupt v2, v3 from other processes; "
              f"open loop {args.rate:g} req/s of {args.batch} examples, {args.timeout:g} s deadlines, "
              f"{args.workload} capped at {args.max_rows} rows, serve flags: {' '.join(serve_args)}")
    print(_report(run, out, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
