"""What ``backend="auto"`` runs on this GPU at dlrmv2 serving shapes: the registry lookup a
shard replica (TableBatchedEmbeddingBag) and a tower replica (dot_interaction, DcnCross) make,
with the log line naming the winners file; and that the auto lookup matches the reference.

    PYTHONPATH=. python3 benchmarks/kernels/show_auto_choices.py

Output on one H200: benchmarks/kernels/results/h200_auto_choices_14d0b94.log.
"""
import torch

from kernels import TableBatchedEmbeddingBag, TableWeights
from kernels.embedding_bag import embedding_bag_reference
from kernels.interaction import _winners, cross_bucket, dot_bucket
from kernels.search.workloads import load_tables

dev = torch.device("cuda")
specs = load_tables("dlrmv2")
pooling = [max(1, round(s["pooling_factor"])) for s in specs]
for dtype in ("fp16", "int8"):
    g = torch.Generator(device=dev).manual_seed(0)
    if dtype == "fp16":
        tables = [TableWeights(torch.randn(1000, 128, device=dev, generator=g).half(), 128, "fp16") for _ in specs]
    else:
        tables = [TableWeights(torch.randint(0, 256, (1000, 128), device=dev, dtype=torch.uint8, generator=g), 128,
                               "int8", torch.rand(1000, device=dev, generator=g) * 0.01,
                               torch.randn(1000, device=dev, generator=g) * 0.1) for _ in specs]
    tb = TableBatchedEmbeddingBag(tables, device=dev, backend="auto")
    for B in (100, 128, 270, 390, 700, 1500, 4096, 8192, 16384, 65536):
        c = tb.choice(tb.groups[0], B, B * sum(pooling))
        print(f"embedding_bag {dtype} B={B}: {c.backend} {c.template or ''} {c.config or ''} (entry {c.key})")
    B = 700
    lengths = torch.tensor(pooling, device=dev).repeat_interleave(B)  # [T*B]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), lengths.cumsum(0)])
    indices = torch.randint(0, 1000, (int(offsets[-1]),), device=dev, generator=g)
    out = tb(indices, offsets)
    ref = embedding_bag_reference(tb.tables, indices, offsets)
    print(f"auto lookup {dtype} B=700 vs reference: max abs diff {(out - ref).abs().max().item():.2e}")
w = _winners(dev)
for dtype in ("fp16", "fp32"):
    for B in (128, 512, 700, 4096, 16384, 65536):
        c = w.lookup("dcn_cross", dtype, cross_bucket(B, 27 * 128, 512))
        d = w.lookup("interaction", dtype, dot_bucket(B, 26, 128))
        print(f"B={B} {dtype}: dcn_cross {c.backend} ({c.key}); dot {d.backend} ({d.key})")
