"""The table-batched lookup: Triton templates against the torch reference on awkward shapes
(dims not powers of two and mixed across tables, empty and ragged bags, batch 1), every
storage dtype, int32/int64 indices, per-id weights, sum and mean pooling."""

from __future__ import annotations

import pytest
import torch
from tests.kernels.kernel_helpers import TOL, make_batch, make_table

from kernels.embedding_bag import (
    DEFAULT_CONFIGS,
    DTYPES,
    TEMPLATES,
    TableBatchedEmbeddingBag,
    TableWeights,
    dequantize_rows,
    embedding_bag_reference,
    launch,
)
from kernels.errors import IndexOutOfRangeError, KernelInputError
from kernels.registry import Winners

DIMS = [5, 12, 3]  # not powers of two, mixed
ROWS = [7, 11, 4]


def _run_template(tb: TableBatchedEmbeddingBag, template, config, indices, offsets, psw, B):
    out = torch.full((B, tb.total_dim), float("nan"), device=tb.device)  # poisoned
    for g in tb.groups:
        launch(g, indices, offsets, psw, out, B, pooling=tb.pooling, template=template, config=config)
    return out


# every template, and the multi-bag one also with several ids per bag per step
VARIANTS = {
    "per_bag": ("per_bag", {}),
    "multi_bag": ("multi_bag", {}),
    "multi_bag_n4": ("multi_bag", {"BAGS": 2, "BLOCK_N": 4}),
    "split_bag": ("split_bag", {"SPLITS": 3, "BLOCK_N": 1}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_matches_reference_on_ragged_mixed_dim_tables(device, dtype, variant, pooling, weighted):
    template, extra = VARIANTS[variant]
    gen = torch.Generator().manual_seed(sum(map(ord, f"{dtype}{variant}{pooling}{weighted}")))
    tables = [make_table(dtype, r, d, gen) for r, d in zip(ROWS, DIMS)]
    B = 3
    index_dtype = torch.int32 if weighted else torch.int64  # both index dtypes covered
    indices, offsets, psw = make_batch(ROWS, B, gen, index_dtype=index_dtype)
    indices, offsets, psw = indices.to(device), offsets.to(device), psw.to(device)
    psw = psw if weighted else None
    tb = TableBatchedEmbeddingBag(tables, pooling=pooling, device=device, backend="triton", warmup=False)
    # BLOCK_D=8 < dim 12: the column split is exercised too
    config = dict(DEFAULT_CONFIGS[template], BLOCK_D=8, **extra)
    out = _run_template(tb, template, config, indices, offsets, psw, B)
    ref = embedding_bag_reference(tb.tables, indices, offsets, psw, pooling=pooling)
    assert out.shape == (B, sum(DIMS)) and out.dtype == torch.float32
    assert not out.isnan().any(), "some output element was never written"
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", ["fp16", "int4"])
def test_public_call_with_batch_of_one(device, index_dtype, dtype):
    gen = torch.Generator().manual_seed(1)
    tables = [make_table(dtype, r, d, gen) for r, d in zip(ROWS, DIMS)]
    indices, offsets, _ = make_batch(ROWS, 1, gen, index_dtype=index_dtype, empty_bags=False)
    tb = TableBatchedEmbeddingBag(tables, device=device, backend="triton", warmup=False)
    out = tb(indices.to(device), offsets.to(device))
    ref = embedding_bag_reference(tb.tables, indices.to(device), offsets.to(device))
    assert out.shape == (1, sum(DIMS))
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_all_empty_bags_give_exact_zeros(device, backend, pooling):
    gen = torch.Generator().manual_seed(2)
    tables = [make_table("int8", r, d, gen) for r, d in zip(ROWS, DIMS)]  # int8: bias must not leak
    B = 2
    indices = torch.zeros(0, dtype=torch.int64, device=device)
    offsets = torch.zeros(len(ROWS) * B + 1, dtype=torch.int64, device=device)
    out = TableBatchedEmbeddingBag(tables, pooling=pooling, device=device, backend=backend, warmup=False)(
        indices, offsets)
    assert torch.equal(out, torch.zeros(B, sum(DIMS), device=device))


def test_tables_of_mixed_storage_dtypes_in_one_shard(device):
    gen = torch.Generator().manual_seed(3)
    tables = [make_table(dt, r, d, gen) for dt, r, d in zip(["fp16", "int8", "fp32"], ROWS, DIMS)]
    indices, offsets, psw = make_batch(ROWS, 4, gen)
    tb = TableBatchedEmbeddingBag(tables, device=device, backend="triton", warmup=False)
    assert [g.dtype for g in tb.groups] == ["fp32", "fp16", "int8"]  # one launch per dtype
    out = tb(indices.to(device), offsets.to(device), psw.to(device))
    ref = embedding_bag_reference(tb.tables, indices.to(device), offsets.to(device), psw.to(device))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend, validate", [("triton", "before_launch"), ("reference", "before_launch"),
                                               ("triton", "in_kernel")])
@pytest.mark.parametrize("bad_id", [11, -1])
def test_out_of_range_id_is_rejected_naming_table_and_id(device, backend, validate, bad_id):
    gen = torch.Generator().manual_seed(4)
    tables = [make_table("fp32", r, d, gen) for r, d in zip(ROWS, DIMS)]
    # table 0: bags [0], [1]; table 1: bags [2], [bad]; table 2: bags [], [3]
    indices = torch.tensor([0, 1, 2, bad_id, 3], device=device)
    offsets = torch.tensor([0, 1, 2, 3, 4, 4, 5], device=device)
    tb = TableBatchedEmbeddingBag(tables, device=device, backend=backend, warmup=False, validate=validate)
    tb(torch.tensor([0, 1, 10, 2, 3], device=device), offsets)  # the last valid id of table 1 passes
    with pytest.raises(IndexOutOfRangeError) as err:
        tb(indices, offsets)
    assert err.value.table == 1 and err.value.index == bad_id and err.value.position == 3
    assert "table 1" in str(err.value) and str(bad_id) in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "offsets, field",
    [([0, 1, 2, 3, 4, 4], "offsets"), ([1, 1, 2, 3, 4, 4, 5], "offsets"), ([0, 3, 2, 3, 4, 4, 5], "offsets")],
)
@pytest.mark.parametrize("backend, validate", [("reference", "before_launch"), ("triton", "before_launch"),
                                               ("triton", "in_kernel")])
def test_malformed_offsets_are_rejected(device, offsets, field, backend, validate):
    gen = torch.Generator().manual_seed(5)
    tables = [make_table("fp32", r, d, gen) for r, d in zip(ROWS, DIMS)]
    tb = TableBatchedEmbeddingBag(tables, device=device, backend=backend, warmup=False, validate=validate)
    with pytest.raises(KernelInputError, match=field):
        tb(torch.tensor([0, 1, 2, 3, 3], device=device), torch.tensor(offsets, device=device))


@pytest.mark.parametrize("template", TEMPLATES)
def test_in_kernel_validation_gives_the_same_output_when_inputs_are_valid(device, template):
    gen = torch.Generator().manual_seed(11)
    tables = [make_table(dt, r, d, gen) for dt, r, d in zip(["int8", "int8", "int8"], ROWS, DIMS)]
    indices, offsets, psw = make_batch(ROWS, 3, gen)
    win = Winners({})
    tb = TableBatchedEmbeddingBag(tables, device=device, backend="triton", warmup=False, validate="in_kernel",
                                  winners=win)
    tb._choices = {}
    cfg = dict(DEFAULT_CONFIGS[template], BLOCK_D=8)
    from kernels.registry import Choice

    tb.choice = lambda g, B, n: Choice("triton", template, cfg)  # force the template under test
    out = tb(indices.to(device), offsets.to(device), psw.to(device))
    ref = embedding_bag_reference(tb.tables, indices.to(device), offsets.to(device), psw.to(device))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    bad = indices.clone()
    bad[-1] = ROWS[-1]  # one past the last table's rows
    with pytest.raises(IndexOutOfRangeError) as err:
        tb(bad.to(device), offsets.to(device), psw.to(device))
    assert err.value.table == 2 and err.value.position == bad.numel() - 1


def test_wrong_dtypes_and_layouts_are_rejected_naming_the_field():
    with pytest.raises(KernelInputError, match="weight"):
        TableWeights(weight=torch.zeros(3, 4, dtype=torch.uint8), dim=4, dtype="int4")  # needs [3, 2]
    with pytest.raises(KernelInputError, match="scale"):
        TableWeights(weight=torch.zeros(3, 4, dtype=torch.uint8), dim=4, dtype="int8")
    with pytest.raises(KernelInputError, match="dtype"):
        TableWeights(weight=torch.zeros(3, 4), dim=4, dtype="fp8")
    tb = TableBatchedEmbeddingBag([TableWeights(torch.zeros(3, 4), 4, "fp32")], backend="reference")
    with pytest.raises(KernelInputError, match="indices"):
        tb(torch.zeros(2, dtype=torch.float32), torch.tensor([0, 2]))
    with pytest.raises(KernelInputError, match="per_sample_weights"):
        tb(torch.zeros(2, dtype=torch.int64), torch.tensor([0, 2]), torch.ones(2, dtype=torch.float64))


def test_reference_matches_a_python_loop_over_bags():
    gen = torch.Generator().manual_seed(6)
    tables = [make_table(dt, r, d, gen) for dt, r, d in zip(["bf16", "int4", "int8"], ROWS, DIMS)]
    B = 3
    indices, offsets, psw = make_batch(ROWS, B, gen)
    for pooling in ("sum", "mean"):
        ref = embedding_bag_reference(tables, indices, offsets, psw, pooling=pooling)
        cols = []
        for t, tw in enumerate(tables):
            for b in range(B):
                lo, hi = int(offsets[t * B + b]), int(offsets[t * B + b + 1])
                acc = torch.zeros(tw.dim)
                for p in range(lo, hi):
                    acc += psw[p] * dequantize_rows(tw, indices[p:p + 1])[0]
                if pooling == "mean" and hi > lo:
                    acc /= hi - lo
                cols.append((t, b, acc))
        expect = torch.cat([torch.stack([c[2] for c in cols if c[0] == t]) for t in range(len(tables))], dim=1)
        torch.testing.assert_close(ref, expect, atol=1e-5, rtol=1e-5)


def test_int4_layout_puts_even_elements_in_the_low_nibble():
    # one row, dim 3: q = [1, 2, 15] -> bytes [0x21, 0x0F]
    tw = TableWeights(weight=torch.tensor([[0x21, 0x0F]], dtype=torch.uint8), dim=3, dtype="int4",
                      scale=torch.tensor([0.5]), bias=torch.tensor([-1.0]))
    row = dequantize_rows(tw, torch.tensor([0]))[0]
    assert row.tolist() == [1 * 0.5 - 1, 2 * 0.5 - 1, 15 * 0.5 - 1]


def test_auto_backend_on_cpu_runs_the_reference():
    gen = torch.Generator().manual_seed(8)
    tables = [make_table("fp16", r, d, gen) for r, d in zip(ROWS, DIMS)]
    tb = TableBatchedEmbeddingBag(tables, device="cpu", backend="auto")
    indices, offsets, _ = make_batch(ROWS, 2, gen)
    assert all(tb.choice(g, 2, indices.numel()).backend == "reference" for g in tb.groups)
    torch.testing.assert_close(tb(indices, offsets), embedding_bag_reference(tables, indices, offsets))


def test_auto_backend_on_cpu_serves_concurrent_callers_even_with_the_interpreter_switched_on():
    """A shard replica scores requests from several threads. On a CPU "auto" must not go
    near Triton's interpreter (a test tool, not thread-safe), even when TRITON_INTERPRET=1
    is set, as it is for this test session."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(9)
    tables = [make_table("fp32", r, d, gen) for r, d in zip(ROWS, DIMS)]
    tb = TableBatchedEmbeddingBag(tables, device="cpu", backend="auto")
    batches = [make_batch(ROWS, 16, gen) for _ in range(64)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda b: tb(b[0], b[1]), batches))
    for (indices, offsets, _), out in zip(batches, outs):
        torch.testing.assert_close(out, embedding_bag_reference(tables, indices, offsets))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_gpu_kernel_matches_reference_at_serving_shapes(dtype, template):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(9)
    rows, dims = [1000, 50_000, 37, 4096], [128, 64, 96, 130]
    tables = [make_table(dtype, r, d, gen) for r, d in zip(rows, dims)]
    B = 300
    indices, offsets, psw = make_batch(rows, B, gen, max_len=40)
    tb = TableBatchedEmbeddingBag(tables, device=device, backend="triton", warmup=False)
    extra = {"multi_bag": {"BLOCK_N": 4, "BAGS": 4}, "per_bag": {"BLOCK_N": 32},
             "split_bag": {"SPLITS": 8, "BLOCK_N": 4}}[template]
    for config in ({**DEFAULT_CONFIGS[template]}, {**DEFAULT_CONFIGS[template], "BLOCK_D": 64, **extra}):
        out = _run_template(tb, template, config, indices.to(device), offsets.to(device), psw.to(device), B)
        ref = embedding_bag_reference(tb.tables, indices.to(device), offsets.to(device), psw.to(device))
        torch.testing.assert_close(out, ref, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


@pytest.mark.gpu
def test_gpu_auto_backend_follows_the_winners_table():
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(10)
    tables = [make_table("fp16", 100, 64, gen) for _ in range(3)]
    indices, offsets, _ = make_batch([100] * 3, 64, gen, max_len=4)
    n = indices.numel()
    from kernels.embedding_bag import shape_bucket

    bucket = shape_bucket(64, 64, n / (3 * 64))
    win = Winners({f"embedding_bag/fp16/{bucket}": {"backend": "triton", "template": "multi_bag",
                                                    "config": {"BAGS": 4, "BLOCK_N": 2, "BLOCK_D": 64,
                                                               "num_warps": 2, "num_stages": 1}}})
    tb = TableBatchedEmbeddingBag(tables, device=device, backend="auto", winners=win)
    assert tb.choice(tb.groups[0], 64, n).template == "multi_bag"
    out = tb(indices.to(device), offsets.to(device))
    torch.testing.assert_close(out, embedding_bag_reference(tb.tables, indices.to(device), offsets.to(device)),
                               atol=1e-4, rtol=1e-4)
    lose = Winners({f"embedding_bag/fp16/{bucket}": {"backend": "reference"}})
    tb = TableBatchedEmbeddingBag(tables, device=device, backend="auto", winners=lose)
    assert tb.choice(tb.groups[0], 64, n).backend == "reference"


def test_packed_weights_are_held_once_and_the_reference_reads_views_of_them(device):
    gen = torch.Generator().manual_seed(12)
    tables = [make_table(dt, r, d, gen) for dt, r, d in zip(["fp16", "fp16", "int8"], ROWS, DIMS)]
    tb = TableBatchedEmbeddingBag(tables, device=device, backend="triton", warmup=False)
    for g in tb.groups:
        lo = g.weight.data_ptr()
        hi = lo + g.weight.numel() * g.weight.element_size()
        for i in g.table_ids:
            assert lo <= tb.tables[i].weight.data_ptr() < hi  # a view, not a second copy
            assert torch.equal(tb.tables[i].weight.cpu(), tables[i].weight)
