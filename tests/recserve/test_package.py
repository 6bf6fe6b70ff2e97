"""Export then load: every dtype, row-wise slices, and refusal of damaged packages."""

import json
import shutil

import pytest
import torch

from recserve.cli import main as cli
from recserve.export import export_package
from recserve.layout import embedding_key
from recserve.package import MANIFEST, ModelPackage, PackageError, shard_file
from kernels.quantize import dequantize, error_bound
from sharding.types import Shard, ShardPlan, TableSlice, row_bytes


def hand_plan(workload, dtype, layout):
    """layout: list of shards, each a list of (table, row_start, row_end)."""
    dims = {t.name: t for t in workload.tables}
    shards = []
    for i, slices in enumerate(layout):
        shards.append(
            Shard(
                index=i,
                slices=tuple(
                    TableSlice(
                        table=name,
                        row_start=a,
                        row_end=b,
                        rows_total=dims[name].rows,
                        dim=dims[name].dim,
                        bytes=(b - a) * row_bytes(dims[name].dim, dtype),
                        cost=1.0,
                    )
                    for name, a, b in slices
                ),
            )
        )
    return ShardPlan(strategy="table", dtype=dtype, shard_memory=None, shards=tuple(shards))


# t_item (5000 rows) is split row-wise across shards 0 and 1
SPLIT = [[("t_user", 0, 1000), ("t_item", 0, 2345)], [("t_item", 2345, 5000), ("t_hist", 0, 5000), ("t_cat", 0, 50)]]


@pytest.fixture(scope="module")
def state_dict(tiny_state_dict):
    return torch.load(tiny_state_dict, weights_only=True)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8", "int4"])
def test_export_then_load_gives_back_every_table_slice(tmp_path, tiny, tiny_state_dict, state_dict, dtype):
    plan = hand_plan(tiny, dtype, SPLIT)
    result = export_package(tiny, tiny_state_dict, tmp_path / "pkg", plan=plan, progress=False)
    pkg = ModelPackage.open(result.path)
    pkg.verify()
    assert pkg.manifest.dtype == dtype and pkg.manifest.plan == plan
    for shard in plan.shards:
        for s in pkg.load_shard(shard.index):
            full = state_dict[embedding_key(s.table)][s.row_start : s.row_end]
            if dtype == "fp32":
                assert torch.equal(s.weight, full)  # bit-exact
            elif dtype in ("fp16", "bf16"):
                assert torch.equal(s.weight, full.to(s.weight.dtype))
            else:
                back = dequantize(s.weight, s.scale, s.bias, dtype, s.dim)
                assert torch.all((back - full).abs() <= error_bound(full, dtype))
    dense = pkg.load_dense()
    for key, t in dense.items():
        assert torch.equal(t, state_dict[key])
    assert not any(k.startswith("sparse_arch") for k in dense)


def test_a_shard_file_holds_only_its_own_slices(tmp_path, tiny, tiny_state_dict):
    pkg = ModelPackage.open(export_package(tiny, tiny_state_dict, tmp_path / "p", plan=hand_plan(tiny, "fp32", SPLIT), progress=False).path)
    assert [(s.table, s.row_start, s.row_end) for s in pkg.load_shard(0)] == [("t_user", 0, 1000), ("t_item", 0, 2345)]
    assert (tmp_path / "p" / shard_file(0)).stat().st_size < (tmp_path / "p" / shard_file(1)).stat().st_size


def test_same_model_and_plan_give_the_same_version(tmp_path, tiny, tiny_state_dict):
    plan = hand_plan(tiny, "fp16", SPLIT)
    a = export_package(tiny, tiny_state_dict, tmp_path / "a", plan=plan, progress=False)
    b = export_package(tiny, tiny_state_dict, tmp_path / "b", plan=plan, progress=False)
    assert ModelPackage.open(a.path).manifest.version == ModelPackage.open(b.path).manifest.version


@pytest.fixture
def package(tmp_path, tiny, tiny_state_dict):
    return export_package(tiny, tiny_state_dict, tmp_path / "pkg", plan=hand_plan(tiny, "int8", SPLIT), progress=False).path


def _edit_manifest(package, edit):
    raw = json.loads((package / MANIFEST).read_text())
    edit(raw)
    (package / MANIFEST).write_text(json.dumps(raw))


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "corrupted shard": (lambda p: _flip_byte(p / shard_file(1), -3), "shard-1.safetensors: sha256"),
    "corrupted dense": (lambda p: _flip_byte(p / "dense.safetensors", 200), "dense.safetensors: sha256"),
    "truncated shard": (lambda p: (p / shard_file(0)).write_bytes((p / shard_file(0)).read_bytes()[:-100]), "shard-0.safetensors: size"),
    "missing shard": (lambda p: (p / shard_file(1)).unlink(), "shard-1.safetensors: missing"),
    "missing manifest": (lambda p: (p / MANIFEST).unlink(), "manifest.json: not found"),
    "manifest not json": (lambda p: (p / MANIFEST).write_text("{"), "not valid JSON"),
    "unknown manifest key": (lambda p: _edit_manifest(p, lambda r: r.update(extra=1)), "unknown key"),
    "future format": (lambda p: _edit_manifest(p, lambda r: r.update(format_version=99)), "format_version 99"),
    "table rows mismatch": (lambda p: _edit_manifest(p, lambda r: r["workload"]["tables"][0].update(rows=999)), "t_user"),
    "dense shape mismatch": (
        lambda p: _edit_manifest(p, lambda r: r["dense_tensors"].update({next(iter(r["dense_tensors"])): [3, 3]})),
        "manifest implies",
    ),
    "swapped shard files": (lambda p: shutil.copy(p / shard_file(0), p / shard_file(1)), "shard-1.safetensors"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_package_is_refused_naming_the_file_and_problem(package, damage):
    apply, message = DAMAGE[damage]
    apply(package)
    with pytest.raises(PackageError, match=message.replace("(", r"\(")):
        ModelPackage.open(package).verify()


def test_inspect_verifies_and_exits_non_zero_on_damage(package, capsys):
    assert cli(["inspect", str(package)]) == 0
    out = capsys.readouterr().out
    assert "t_item[0:2345)" in out and "verified" in out
    _flip_byte(package / shard_file(0), -1)
    assert cli(["inspect", str(package)]) == 1
    err = capsys.readouterr().err
    assert "shard-0.safetensors" in err and "sha256" in err


def test_a_state_dict_of_another_model_is_refused(tmp_path, tiny, tiny_state_dict):
    other = tiny.with_max_rows(100)
    with pytest.raises(PackageError, match="shape"):
        export_package(other, tiny_state_dict, tmp_path / "x", plan=hand_plan(other, "fp32", [[("t_user", 0, 100)]]), progress=False)
    assert not (tmp_path / "x").exists()


def test_export_refuses_to_overwrite_without_being_asked(package, tiny, tiny_state_dict):
    with pytest.raises(PackageError, match="already exists"):
        export_package(tiny, tiny_state_dict, package, plan=hand_plan(tiny, "fp32", SPLIT), progress=False)


@pytest.mark.parametrize(
    "strategy, shards, extra",
    [("singular", 1, []), ("table", 3, []), ("capacity", 2, ["--shard-memory", "120KiB"]), ("load", 3, ["--shard-memory", "150KiB"])],
)
def test_export_cli_plans_writes_and_inspects_for_every_strategy(tmp_path, tiny_state_dict, strategy, shards, extra, capsys):
    out = tmp_path / "pkg"
    args = ["export", "--workload", "tiny", "--state-dict", str(tiny_state_dict),
            "--out", str(out), "--strategy", strategy, "--shards", str(shards), "--dtype", "fp16", *extra]
    assert cli(args) == 0
    assert "peak RSS" in capsys.readouterr().out
    pkg = ModelPackage.open(out)
    pkg.verify()
    assert pkg.manifest.plan.strategy == strategy and pkg.manifest.plan.num_shards == shards
    if strategy in ("capacity", "load"):  # the caps force t_item/t_hist (80 KiB fp16... 80,000 B) to split
        assert all(sh.bytes <= pkg.manifest.plan.shard_memory for sh in pkg.manifest.plan.shards)


def test_export_cli_drops_faded_features_and_says_why_it_cannot_place(tmp_path, tiny_state_dict, capsys):
    out = tmp_path / "pkg"
    base = ["export", "--workload", "tiny", "--state-dict", str(tiny_state_dict)]
    assert cli([*base, "--out", str(out), "--shards", "2", "--drop-features", "recent_items"]) == 0
    m = ModelPackage.open(out).manifest
    assert "t_hist" not in m.plan.tables and m.dropped_features == ("recent_items",)
    ModelPackage.open(out).verify()
    capsys.readouterr()
    assert cli([*base, "--out", str(tmp_path / "x"), "--strategy", "capacity", "--shards", "1", "--shard-memory", "10KiB"]) == 2
    assert "t_" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli([*base, "--out", str(tmp_path / "y"), "--drop-features", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
