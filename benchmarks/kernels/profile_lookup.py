"""Launch a few lookup configs on the benchmark shapes, for Nsight Compute to profile.

    ncu -k regex:_eb_ --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats python benchmarks/kernels/profile_lookup.py
"""

from __future__ import annotations

import sys

import torch

from kernels.bench import _fixed_bags, _random_table
from kernels.embedding_bag import TableBatchedEmbeddingBag, launch
from kernels.search.workloads import load_tables

CONFIGS = [
    ("a fp32", "multi_bag", {"BAGS": 8, "BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 4, "num_stages": 2}),
    ("a fp32", "per_bag", {"BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 1, "num_stages": 1, "EVICT": 1}),
    ("b fp16", "multi_bag", {"BAGS": 8, "BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}),
    ("b fp16", "per_bag", {"BLOCK_N": 8, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}),
    ("b512 fp16", "per_bag", {"BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 1, "num_stages": 1, "EVICT": 1}),
    ("b512 int8", "per_bag", {"BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 1, "num_stages": 1, "EVICT": 1}),
]


def main() -> None:
    only = set(sys.argv[1:])  # case names to run, e.g. "b512 fp16" (default all)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    specs = load_tables("dlrmv2")
    pooling = [round(s["pooling_factor"]) for s in specs]
    cases = {
        "a fp32": lambda: ([_random_table("fp32", 10_000_000, 128, dev)], [32], 16384),
        "b fp16": lambda: ([_random_table("fp16", min(s["rows"], 2_000_000), 128, dev) for s in specs], pooling, 4096),
        "b512 fp16": lambda: ([_random_table("fp16", min(s["rows"], 2_000_000), 128, dev) for s in specs], pooling, 512),
        "b512 int8": lambda: ([_random_table("int8", min(s["rows"], 2_000_000), 128, dev) for s in specs], pooling, 512),
    }
    for name, template, cfg in CONFIGS:
        if only and name not in only:
            continue
        tables, pooling_, B = cases[name]()
        tb = TableBatchedEmbeddingBag(tables, device=dev, backend="triton", warmup=False)
        indices, offsets = _fixed_bags([t.rows for t in tables], pooling_, B, dev, gen)
        out = torch.empty(B, tb.total_dim, device=dev)
        for _ in range(2):
            launch(tb.groups[0], indices, offsets, None, out, B, pooling="sum", template=template, config=cfg)
        torch.cuda.synchronize()
        print(name, template, cfg, flush=True)


if __name__ == "__main__":
    main()
