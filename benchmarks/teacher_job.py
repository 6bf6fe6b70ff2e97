"""The teacher job end to end (issue 20): ``recserve teacher score`` over a served-example log
of ``--examples`` rows, on Ray Data, with the teacher on ``--device``.

Writes the log first (the package's own workload through :class:`recserve.synth.TrafficGenerator`,
written by the servers' own :class:`serving.example_log.ExampleLog` in requests of
``--request-examples``), then runs the command a user types as a subprocess, and prints its
report (start-up apart from scoring) with the scores' row count read back from the output.

    python benchmarks/teacher_job.py --package PKG --examples 1048576 --device cuda --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_log(package: str, directory: Path, examples: int, request_examples: int, seed: int) -> float:
    """``examples`` rows of the package's workload into ``directory``; returns the seconds taken."""
    from recserve.package import ModelPackage
    from recserve.synth import TrafficGenerator
    from serving.example_log import ExampleLog, ExampleLogConfig

    manifest = ModelPackage.open(package).manifest
    gen = TrafficGenerator(manifest.workload, seed=seed)
    log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=str(directory), rows_per_file=262_144,
                                      max_queued_examples=max(examples, 1)),
                     model=manifest.name, version="served", features=manifest.workload.features)
    t, done, step = time.perf_counter(), 0, max(examples // 20, 1)
    while done < examples:
        b = gen.batch(min(request_examples, examples - done))
        if not log.submit(f"r{done}", b, np.zeros(b.batch_size, np.float32)):
            raise RuntimeError("the example log dropped a request (queue full)")
        done += b.batch_size
        if done // step != (done - b.batch_size) // step:
            print(f"log: {done:,}/{examples:,} examples queued", flush=True)
    log.close()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", required=True, help="the teacher's package (its workload shapes the log)")
    p.add_argument("--examples", type=int, default=1_048_576)
    p.add_argument("--request-examples", type=int, default=512, help="rows per logged request")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="log, scores and result.json go here")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    log_dir, scores = args.out / "log", args.out / "scores"
    log_s = write_log(args.package, log_dir, args.examples, args.request_examples, args.seed)
    print(f"log: {args.examples:,} examples written in {log_s:.1f} s", flush=True)
    cmd = [sys.executable, "-m", "recserve.cli", "teacher", "score", "--logs", str(log_dir), "--teacher",
           args.package, "--out", str(scores), "--device", args.device, "--batch-size", str(args.batch_size),
           "--actors", str(args.actors)]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t
    print(run.stdout, flush=True)
    if run.returncode:
        print(run.stderr[-6000:], file=sys.stderr)
        sys.exit(f"teacher score exited {run.returncode}")
    import pyarrow.dataset as pads

    rows = pads.dataset(str(scores), format="parquet").count_rows()
    result = dict(examples=args.examples, request_examples=args.request_examples, device=args.device,
                  batch_size=args.batch_size, actors=args.actors, log_write_s=round(log_s, 2),
                  command_wall_s=round(wall, 2), score_rows=rows, report=run.stdout.strip().splitlines()[-8:],
                  cpu_count=os.cpu_count(), load_average=os.getloadavg())
    try:
        import torch

        result["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        pass
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"scores: {rows:,} rows; the command took {wall:.1f} s (log written in {log_s:.1f} s)")


if __name__ == "__main__":
    main()
