"""The winners table: which file a device reads, exact and nearest-bucket lookup,
'reference' entries, persistence."""

from __future__ import annotations

import json

import torch

from kernels.registry import (
    MAX_BUCKET_DISTANCE,
    WINNERS_DIR,
    Winners,
    device_slug,
    pow2_bucket,
    select_winners_file,
    slugify,
)


def _entry(block):
    return {"backend": "triton", "template": "per_bag", "config": {"BLOCK_N": block, "BLOCK_D": 128}}


def _write(directory, device, capability, entries=None):
    w = Winners(entries or {"embedding_bag/fp16/d128_p8_b512": _entry(1)},
                meta={"device": device, "slug": slugify(device), "capability": list(capability)})
    w.save(directory / f"{slugify(device)}.json")


def test_lookup_takes_the_exact_bucket_first_then_the_nearest_of_same_op_and_dtype():
    w = Winners({
        "embedding_bag/fp16/d128_p8_b512": _entry(8),
        "embedding_bag/fp16/d128_p8_b4096": _entry(16),
        "embedding_bag/int8/d128_p8_b1024": _entry(32),
    })
    assert w.lookup("embedding_bag", "fp16", "d128_p8_b512").config["BLOCK_N"] == 8
    assert w.lookup("embedding_bag", "fp16", "d128_p8_b2048").config["BLOCK_N"] == 16  # log2 distance 1 (4096) vs 2 (512)
    assert w.lookup("embedding_bag", "fp16", "d128_p8_b256").config["BLOCK_N"] == 8
    assert w.lookup("embedding_bag", "fp16", "d128_p16_b512").config["BLOCK_N"] == 8  # one step in pooling
    assert w.lookup("embedding_bag", "fp32", "d128_p8_b512").backend == "reference"  # no fp32 entry
    assert w.lookup("interaction", "fp16", "n27_d128_b4096").backend == "reference"


def test_a_triton_config_never_runs_farther_than_one_power_of_two_from_where_it_won():
    w = Winners({"embedding_bag/fp16/d128_p8_b512": _entry(8)})
    assert MAX_BUCKET_DISTANCE == 1
    for far in ("d128_p8_b128", "d128_p8_b2048", "d128_p32_b512", "d128_p16_b1024", "d32_p8_b512"):
        got = w.lookup("embedding_bag", "fp16", far)
        assert got.backend == "reference" and got.key is None, far


def test_at_equal_distance_a_reference_entry_wins_over_a_triton_one():
    w = Winners({"dcn_cross/fp16/n4096_r512_b512": {"backend": "reference", "speedup": 0.9},
                 "dcn_cross/fp16/n4096_r512_b2048": {"backend": "triton", "template": "cross_gemm",
                                                     "config": {"BLOCK_M": 64}}})
    assert w.lookup("dcn_cross", "fp16", "n4096_r512_b1024").backend == "reference"
    assert w.lookup("dcn_cross", "fp16", "n4096_r512_b4096").backend == "triton"


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


def test_a_device_reads_its_own_winners_file_first(tmp_path):
    _write(tmp_path, "NVIDIA H100 80GB HBM3", (9, 0))
    _write(tmp_path, "NVIDIA H200", (9, 0))
    got = select_winners_file("NVIDIA H200", (9, 0), tmp_path)
    assert got.path == tmp_path / "nvidia-h200.json" and "own" in got.reason


def test_a_device_without_a_file_reads_the_winners_of_its_compute_capability(tmp_path):
    _write(tmp_path, "NVIDIA A100-SXM4-80GB", (8, 0))
    _write(tmp_path, "NVIDIA H100 80GB HBM3", (9, 0))
    got = select_winners_file("NVIDIA H200", (9, 0), tmp_path)
    assert got.path == tmp_path / "nvidia-h100-80gb-hbm3.json"
    assert "NVIDIA H100 80GB HBM3" in got.reason and "sm_90" in got.reason


def test_a_device_of_another_compute_capability_gets_no_file_and_runs_the_reference(tmp_path):
    _write(tmp_path, "NVIDIA H100 80GB HBM3", (9, 0))
    got = select_winners_file("NVIDIA L4", (8, 9), tmp_path)
    assert got.path is None and "reference" in got.reason
    assert select_winners_file("NVIDIA H200", (9, 0), tmp_path / "empty").path is None


def test_every_committed_winners_file_names_its_device_slug_and_capability():
    files = sorted(WINNERS_DIR.glob("*.json"))
    assert files
    for path in files:
        meta = {k: v for k, v in json.loads(path.read_text()).items() if k != "entries"}
        assert meta["slug"] == slugify(meta["device"]) == path.stem, path
        assert isinstance(meta["capability"], list) and len(meta["capability"]) == 2, path
        assert select_winners_file(meta["device"], tuple(meta["capability"])).path == path


def test_an_h200_finds_hopper_winners_among_the_committed_files():
    got = select_winners_file("NVIDIA H200", (9, 0))
    assert got.path is not None and Winners.load(got.path).meta["capability"] == [9, 0]


def test_a_replica_logs_which_winners_file_it_uses_once_per_device(tmp_path, capsys):
    from kernels.registry import _announce

    _write(tmp_path, "NVIDIA H100 80GB HBM3", (9, 0))
    source = select_winners_file("NVIDIA H200", (9, 0), tmp_path)
    for _ in range(3):
        _announce(torch.device("cuda", 7), "NVIDIA H200", source)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"kernels: cuda:7 (NVIDIA H200) uses winners {tmp_path / 'nvidia-h100-80gb-hbm3.json'}: "
                     "no file of its own; NVIDIA H100 80GB HBM3 has the same compute capability sm_90"]


def test_cpu_devices_have_no_winners_and_a_cpu_slug():
    assert Winners.for_device(torch.device("cpu")).entries == {}
    assert device_slug("cpu") == "cpu"


def test_slugs_are_the_lowercased_device_name_with_dashes():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slugify("NVIDIA H200") == "nvidia-h200"


def test_pow2_bucket_rounds_to_the_nearest_power_of_two():
    assert [pow2_bucket(x) for x in (0.3, 1, 3, 5.9, 100, 214)] == [1, 1, 4, 8, 128, 256]  # nearest in log2
