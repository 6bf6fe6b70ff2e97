"""The teacher job's scoring step on a GPU, timed apart from its start-up (issue 20).

What each actor of ``recserve teacher score`` does per batch -- validate the batch against the
package, split it over the shards, look the ids up, assemble, run the tower
(``serving.engine.in_process_teacher.ranker_logits``, LocalRanker's shards and tower) -- over >= 1M
examples of tiny-shaped traffic, with the teacher package on ``--device``. Ray and Parquet are
not part of it (the GPU machine has no Ray): start-up (opening the package, loading it onto
the device) and the first batch (CUDA context, kernel compilation) are reported apart from
the steady examples/s; the same batches' scores on the CPU check the GPU's.

    python3 benchmarks/teacher_gpu.py --package PKG --device cuda --examples 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--examples", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument("--cpu-batches", type=int, default=3, help="batches also scored on the CPU (check and baseline)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = p.parse_args()

    import torch

    from recserve.package import ModelPackage
    from recserve.synth import TrafficGenerator
    from serving.engine.in_process_teacher import InProcessTeacher
    from recserve.workloads import load_workload

    info = dict(torch=torch.__version__, device_name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                cpu_count=os.cpu_count(), load_average=os.getloadavg())
    manifest = ModelPackage.open(args.package).manifest
    workload = load_workload("tiny")  # the teacher's features are tiny's
    gen = TrafficGenerator(workload, seed=0)
    n_batches = -(-args.examples // args.batch_size)
    t = time.perf_counter()
    batches = [gen.batch(args.batch_size) for _ in range(n_batches)]
    info["traffic_s"] = time.perf_counter() - t

    t = time.perf_counter()
    teacher = InProcessTeacher(args.package, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    startup_s = time.perf_counter() - t
    t = time.perf_counter()
    first = teacher.logits(batches[0])
    first_batch_s = time.perf_counter() - t

    times = []
    t_all = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        teacher.logits(b)  # returns numpy: synchronised with the device
        times.append(time.perf_counter() - t)
    total_s = time.perf_counter() - t_all
    examples = sum(b.batch_size for b in batches)

    cpu = InProcessTeacher(args.package, device="cpu")
    t = time.perf_counter()
    cpu_scores = [cpu.logits(b) for b in batches[:args.cpu_batches]]
    cpu_s = time.perf_counter() - t
    diff = float(np.abs(cpu_scores[0] - first).max())
    result = dict(
        **info, package=f"{manifest.name} {manifest.version}", device=args.device, examples=examples,
        batch_size=args.batch_size, batches=len(batches), startup_s=startup_s, first_batch_s=first_batch_s,
        steady_s=total_s, examples_per_s=examples / total_s, batch_ms_p50=1e3 * float(np.median(times)),
        batch_ms_max=1e3 * float(np.max(times)), cpu_threads=torch.get_num_threads(),
        cpu_examples_per_s=args.cpu_batches * args.batch_size / cpu_s, max_abs_logit_diff_vs_cpu=diff)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
