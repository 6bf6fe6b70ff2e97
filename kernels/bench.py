"""The kernels' benchmark: lookups and interaction on a GPU, always beside torch.

    python -m kernels.bench [--out results.json] [--rows-cap 4000000]
    recserve kernels bench

Prints one table: for each case the torch time, the kernel time (searched winner, or the
default config where the winners file has none), speed-up, and for lookups the effective
bandwidth (bytes of embedding rows read / time) next to the device's copy bandwidth
measured in the same run (bytes read + bytes written / time).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.embedding_bag import TableBatchedEmbeddingBag, TableWeights, embedding_bag_reference
from kernels.interaction import dcn_cross, dcn_cross_reference, dot_interaction, dot_interaction_reference
from kernels.quantize import ELEMENT_BITS, FLOAT_DTYPES, QUANTIZED, SCALE_BIAS_BYTES, weight_cols
from kernels.search.workloads import load_tables
from kernels.timing import CudaTimer, copy_bandwidth

_BYTES = {d: bits / 8 for d, bits in ELEMENT_BITS.items()}


def _commit() -> str:
    import os

    if os.environ.get("RECSERVE_COMMIT"):  # set by callers that run a copy without .git
        return os.environ["RECSERVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def _random_table(dtype: str, rows: int, dim: int, device) -> TableWeights:
    if dtype in FLOAT_DTYPES:
        return TableWeights(torch.randn(rows, dim, device=device, dtype=FLOAT_DTYPES[dtype]), dim, dtype)
    cols = weight_cols(dim, dtype)
    q = torch.randint(0, 256, (rows, cols), device=device, dtype=torch.uint8)
    scale = torch.rand(rows, device=device) * 0.01
    bias = torch.randn(rows, device=device) * 0.1
    return TableWeights(q, dim, dtype, scale, bias)


def _fixed_bags(rows: list[int], pooling: list[int], B: int, device, gen):
    """Every bag of table t holds exactly pooling[t] uniform ids (MLPerf multi-hot sizes)."""
    ids, lengths = [], []
    for r, p in zip(rows, pooling):
        ids.append(torch.randint(0, r, (B * p,), device=device, generator=gen))
        lengths.append(torch.full((B,), p, device=device, dtype=torch.int64))
    indices = torch.cat(ids)  # [N]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cat(lengths).cumsum(0)])
    return indices, offsets


def row_bytes_of(tables, pooling, B) -> float:
    """Bytes of embedding rows a lookup must read (plus scale/bias for quantized rows)."""
    n = sum(len_t * B * tw.dim * _BYTES[tw.dtype] for len_t, tw in zip(pooling, tables))
    if tables[0].dtype in QUANTIZED:
        n += sum(len_t * B * SCALE_BIAS_BYTES for len_t in pooling)
    return n


def _best_of(timer, fn, rounds: int = 3) -> float:
    """Min over rounds of the timer's median: robust to a transient slow round."""
    return min(timer(fn) for _ in range(rounds))


def _graph_time(timer, fn) -> float:
    """Device time of ``fn`` alone: captured once in a CUDA graph, replays timed. This takes
    the host's launch work out of the figure (NaN if ``fn`` cannot be captured)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return _best_of(timer, graph.replay)
    except Exception as e:  # e.g. an op that syncs with the host
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:120]})")
        torch.cuda.synchronize()
        return float("nan")


def bench_lookup(name, tables, pooling, B, timer, copy_bw, device, gen, torch_fn=None) -> dict:
    rows = [t.rows for t in tables]
    indices, offsets = _fixed_bags(rows, pooling, B, device, gen)
    T = len(tables)
    tb = TableBatchedEmbeddingBag(tables, device=device, backend="triton")
    choice = tb.choice(tb.groups[0], B, indices.numel())
    out = tb(indices, offsets)
    ref = embedding_bag_reference(tb.tables, indices, offsets)
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    # torch: one F.embedding_bag per table, inputs pre-sliced so only the calls are timed
    bounds = offsets[::B].tolist()
    per_table = [(indices[bounds[t]:bounds[t + 1]], offsets[t * B:t * B + B + 1] - bounds[t]) for t in range(T)]
    if torch_fn is None:
        def torch_fn():
            outs = [F.embedding_bag(i, tw.weight, o, mode="sum", include_last_offset=True)
                    for tw, (i, o) in zip(tb.tables, per_table)]
            return outs[0] if T == 1 else torch.cat(outs, dim=1)
    t_torch = _best_of(timer, torch_fn)
    t_kernel = _best_of(timer, lambda: tb.forward_unchecked(indices, offsets, None, B))
    t_checked = _best_of(timer, lambda: tb(indices, offsets))  # validate before launch (default)
    tb.validate = "in_kernel"
    t_fused = _best_of(timer, lambda: tb(indices, offsets))
    tb.validate = "before_launch"
    g_torch = _graph_time(timer, torch_fn)
    g_kernel = _graph_time(timer, lambda: tb.forward_unchecked(indices, offsets, None, B))
    row_bytes = row_bytes_of(tables, pooling, B)
    return dict(case=name, torch_us=t_torch * 1e6, kernel_us=t_kernel * 1e6, checked_us=t_checked * 1e6,
                graph_torch_us=g_torch * 1e6, graph_kernel_us=g_kernel * 1e6, graph_speedup=g_torch / g_kernel,
                graph_eff_tbs=row_bytes / g_kernel / 1e12,
                fused_us=t_fused * 1e6, speedup_checked=t_torch / t_checked, speedup_fused=t_torch / t_fused,
                speedup=t_torch / t_kernel, eff_tbs=row_bytes / t_kernel / 1e12,
                pct_copy=100 * row_bytes / t_kernel / copy_bw, rel_err=err,
                config=f"{choice.template} {choice.config}" + ("" if choice.key else " (default)"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--rows-cap", type=int, default=4_000_000, help="cap dlrmv2 table rows (memory)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--only", default="", help="comma list: a,b,dot,dcn,caps (default all but caps)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    only = set(filter(None, args.only.split(",")))
    timer = CudaTimer(warmup=5, reps=args.reps)
    gen = torch.Generator(device=device).manual_seed(0)
    copy_bw = copy_bandwidth(timer)
    import triton

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=_commit(), python=platform.python_version(), copy_tbs=copy_bw / 1e12)
    print(f"# {meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}  "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write)", flush=True)
    results = []

    if not only or "a" in only:  # (a) one 10M x 128 table, B=16384, 32 ids per bag
        for dtype in ("fp32", "fp16"):
            tables = [_random_table(dtype, 10_000_000, 128, device)]
            results.append(bench_lookup(f"lookup a {dtype} 10Mx128 B=16384 L=32", tables, [32], 16384,
                                        timer, copy_bw, device, gen))
            print(results[-1], flush=True)
            del tables
            torch.cuda.empty_cache()

    if not only or "b" in only:  # (b) 26 dlrmv2 tables, fixed multi-hot sizes
        specs = load_tables("dlrmv2")
        rows = [min(s["rows"], args.rows_cap) for s in specs]
        pooling = [int(round(s["pooling_factor"])) for s in specs]
        for dtype in ("fp16", "int8"):
            tables = [_random_table(dtype, r, s["dim"], device) for r, s in zip(rows, specs)]
            for B in (512, 4096):
                # torch has no int8 bag: its loop gathers, dequantizes and bags per table
                res = bench_lookup(f"lookup b {dtype} dlrmv2x26 B={B}", tables, pooling, B, timer, copy_bw,
                                   device, gen, torch_fn=_int8_torch_loop(tables, pooling, B, device, gen)
                                   if dtype == "int8" else None)
                results.append(res)
                print(res, flush=True)
            del tables
            torch.cuda.empty_cache()

    if "caps" in only:  # how table size alone moves (b) fp16 B=512 (TLB reach, not bytes moved)
        specs = load_tables("dlrmv2")
        pooling = [int(round(s["pooling_factor"])) for s in specs]
        for cap in (500_000, 2_000_000, 8_000_000):
            tables = [_random_table("fp16", min(s["rows"], cap), s["dim"], device) for s in specs]
            gb = sum(t.weight.numel() * 2 for t in tables) / 1e9
            res = bench_lookup(f"lookup b fp16 B=512 rows cap {cap:,} ({gb:.1f} GB)", tables, pooling, 512,
                               timer, copy_bw, device, gen)
            results.append(res)
            print(res, flush=True)
            del tables
            torch.cuda.empty_cache()

    if not only or "dot" in only:  # dot interaction, 27 vectors x 128, fp16
        for B in (4096, 16384):
            dense = torch.randn(B, 128, device=device, dtype=torch.float16, generator=gen)
            sparse = torch.randn(B, 26, 128, device=device, dtype=torch.float16, generator=gen)
            out = dot_interaction(dense, sparse, backend="triton")
            ref = dot_interaction_reference(dense.double(), sparse.double())
            err = ((out.double() - ref).norm() / ref.norm()).item()
            t_torch = _best_of(timer, lambda: dot_interaction_reference(dense, sparse))
            t_kernel = _best_of(timer, lambda: dot_interaction(dense, sparse, backend="triton"))
            g_torch = _graph_time(timer, lambda: dot_interaction_reference(dense, sparse))
            g_kernel = _graph_time(timer, lambda: dot_interaction(dense, sparse, backend="triton"))
            nbytes = (dense.numel() + sparse.numel() + out.numel()) * 2
            results.append(dict(case=f"dot interaction fp16 27x128 B={B}", torch_us=t_torch * 1e6,
                                graph_torch_us=g_torch * 1e6, graph_kernel_us=g_kernel * 1e6,
                                graph_speedup=g_torch / g_kernel, graph_eff_tbs=nbytes / g_kernel / 1e12,
                                kernel_us=t_kernel * 1e6, speedup=t_torch / t_kernel,
                                eff_tbs=nbytes / t_kernel / 1e12, pct_copy=100 * nbytes / t_kernel / copy_bw,
                                rel_err=err))
            print(results[-1], flush=True)

    if not only or "dcn" in only:  # DCNv2 cross, dlrmv2: N = 27 * 128, rank 512, 3 layers
        N, r = 27 * 128, 512
        for B in (512, 4096):
            V = [torch.randn(r, N, device=device, generator=gen).div(N**0.5).half() for _ in range(3)]
            W = [torch.randn(N, r, device=device, generator=gen).div(r**0.5).half() for _ in range(3)]
            bb = [torch.randn(N, device=device, generator=gen).half() for _ in range(3)]
            x0 = torch.randn(B, N, device=device, generator=gen).half()
            out = dcn_cross(x0, V, W, bb, backend="triton")
            ref = dcn_cross_reference(x0.float(), [v.float() for v in V], [w.float() for w in W],
                                      [x.float() for x in bb])
            err = ((out.float() - ref).norm() / ref.norm()).item()
            t_torch = _best_of(timer, lambda: dcn_cross_reference(x0, V, W, bb))
            t_kernel = _best_of(timer, lambda: dcn_cross(x0, V, W, bb, backend="triton"))
            g_torch = _graph_time(timer, lambda: dcn_cross_reference(x0, V, W, bb))
            g_kernel = _graph_time(timer, lambda: dcn_cross(x0, V, W, bb, backend="triton"))
            flops = 3 * 2 * (2 * B * N * r)
            results.append(dict(case=f"dcn cross fp16 N=3456 r=512 L=3 B={B}", torch_us=t_torch * 1e6,
                                graph_torch_us=g_torch * 1e6, graph_kernel_us=g_kernel * 1e6,
                                graph_speedup=g_torch / g_kernel,
                                kernel_us=t_kernel * 1e6, speedup=t_torch / t_kernel,
                                tflops=flops / t_kernel / 1e12, rel_err=err))
            print(results[-1], flush=True)

    print()
    print(f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; commit {meta['commit']}; "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    print("| case | torch us | kernel us | speed-up | eff. TB/s | % of copy BW | +checks before launch us (x torch) "
          "| +checks in kernel us (x torch) | rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for r in results:
        print(f"| {r['case']} | {r['torch_us']:.1f} | {r['kernel_us']:.1f} | {r['speedup']:.2f}x | "
              f"{r.get('eff_tbs', nan):.2f} | {r.get('pct_copy', nan):.0f}% | "
              f"{r.get('checked_us', nan):.1f} ({r.get('speedup_checked', nan):.2f}x) | "
              f"{r.get('fused_us', nan):.1f} ({r.get('speedup_fused', nan):.2f}x) | {r['rel_err']:.1e} |")
    print()
    print("Device time (CUDA graph replay: the host's launch work taken out)")
    print("| case | torch us | kernel us | speed-up | eff. TB/s | % of copy BW |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        eff = r.get("graph_eff_tbs", nan)
        print(f"| {r['case']} | {r.get('graph_torch_us', nan):.1f} | {r.get('graph_kernel_us', nan):.1f} | "
              f"{r.get('graph_speedup', nan):.2f}x | {eff:.2f} | {100 * eff * 1e12 / copy_bw:.0f}% |")
    for r in results:
        if "config" in r:
            print(f"  {r['case']}: {r['config']}")
    if args.out:
        args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    return 0


def _int8_torch_loop(tables, pooling, B, device, gen):
    """Torch per-table loop for quantized tables: gather rows, dequantize, F.embedding_bag."""
    from kernels.embedding_bag import dequantize_rows

    rows = [t.rows for t in tables]
    indices, offsets = _fixed_bags(rows, pooling, B, device, gen)
    bounds = offsets[::B].tolist()
    per_table = [(indices[bounds[t]:bounds[t + 1]], offsets[t * B:t * B + B + 1] - bounds[t])
                 for t in range(len(tables))]

    def fn():
        outs = []
        for tw, (i, o) in zip(tables, per_table):
            vals = dequantize_rows(tw, i)  # [n_t, dim] fp32
            outs.append(F.embedding_bag(torch.arange(i.numel(), device=device), vals, o, mode="sum",
                                        include_last_offset=True))
        return torch.cat(outs, dim=1)

    return fn


if __name__ == "__main__":
    sys.exit(main())
