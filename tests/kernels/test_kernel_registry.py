"""The winners table: exact and nearest-bucket lookup, 'reference' entries, persistence."""

from __future__ import annotations

import torch

from kernels.registry import Winners, device_slug, pow2_bucket


def _entry(block):
    return {"backend": "triton", "template": "per_bag", "config": {"BLOCK_N": block, "BLOCK_D": 128}}


def test_lookup_takes_the_exact_bucket_first_then_the_nearest_of_same_op_and_dtype():
    w = Winners({
        "embedding_bag/fp16/d128_p8_b512": _entry(8),
        "embedding_bag/fp16/d128_p8_b4096": _entry(16),
        "embedding_bag/int8/d128_p8_b1024": _entry(32),
    })
    assert w.lookup("embedding_bag", "fp16", "d128_p8_b512").config["BLOCK_N"] == 8
    assert w.lookup("embedding_bag", "fp16", "d128_p8_b2048").config["BLOCK_N"] == 16  # log2 distance 1 (4096) vs 2 (512)
    assert w.lookup("embedding_bag", "fp16", "d128_p8_b256").config["BLOCK_N"] == 8
    assert w.lookup("embedding_bag", "fp32", "d128_p8_b512").backend == "reference"  # no fp32 entry
    assert w.lookup("interaction", "fp16", "n27_d128_b4096").backend == "reference"


def test_a_reference_entry_means_the_reference_runs():
    w = Winners({"interaction/fp16/n27_d128_b4096": {"backend": "reference", "speedup": 0.7}})
    got = w.lookup("interaction", "fp16", "n27_d128_b4096")
    assert got.backend == "reference" and got.key == "interaction/fp16/n27_d128_b4096"


def test_winners_survive_a_save_and_load(tmp_path):
    w = Winners({"embedding_bag/int4/d64_p1_b1": _entry(4)}, meta={"device": "X"})
    w.save(tmp_path / "x.json")
    back = Winners.load(tmp_path / "x.json")
    assert back.entries == w.entries and back.meta["device"] == "X"
    assert Winners.load(tmp_path / "missing.json").entries == {}


def test_cpu_devices_have_no_winners_and_a_cpu_slug():
    assert Winners.for_device(torch.device("cpu")).entries == {}
    assert device_slug("cpu") == "cpu"


def test_pow2_bucket_rounds_to_the_nearest_power_of_two():
    assert [pow2_bucket(x) for x in (0.3, 1, 3, 5.9, 100, 214)] == [1, 1, 4, 8, 128, 256]  # nearest in log2
