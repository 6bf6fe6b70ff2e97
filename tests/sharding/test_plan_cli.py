"""``recserve plan``: workload -> plan on the command line, sizes, table specs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recserve.cli import main
from recserve.planning import parse_bytes, table_specs
from recserve.workloads import load_workload
from sharding import ShardPlan, check_plan


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000", 1000),
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1GB", 10**9),
        ("80gb", 80 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("64 KiB", 65536),
        ("10B", 10),
    ],
)
def test_parse_bytes_accepts_plain_bytes_and_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "0", "1.5", "12 parsecs", "0.1B"])
def test_parse_bytes_rejects_anything_else(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_table_specs_carry_rows_dim_pooling_and_dtype_in_model_order():
    w = load_workload("dlrmv2")
    specs = table_specs(w, "int8")
    assert [s.name for s in specs] == [t.name for t in w.tables]
    t20 = next(s for s in specs if s.name == "t_cat_20")
    assert (t20.rows, t20.dim, t20.pooling_factor, t20.dtype) == (40_000_000, 128, 100, "int8")
    assert t20.bytes == 40_000_000 * (128 + 8)


def test_table_specs_count_every_feature_that_reads_a_table():
    raw = load_workload("tiny")
    import dataclasses

    shared = dataclasses.replace(raw.tables[0], features=("user_id", "friend_id"))
    w = dataclasses.replace(raw, tables=(shared, *raw.tables[1:]))
    assert table_specs(w, "fp32")[0].pooling_factor == 2 * raw.tables[0].pooling_factor
    with pytest.raises(ValueError, match="unknown table"):
        table_specs(w, "fp32", request_rates={"nope": 0.5})


def test_plan_command_prints_shards_and_balance_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", "--workload", "criteo-kaggle", "--strategy", "capacity", "--shards", "4",
                 "--shard-memory", "600MB", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "strategy=capacity" in text and "bytes: max" in text and "cost:  max" in text
    assert "t_cat_2[0:" in text  # 648 MB > 600 MB: split row-wise
    p = ShardPlan.from_json(json.loads(out.read_text()))
    check_plan(p, table_specs(load_workload("criteo-kaggle"), "fp32"))
    assert max(sh.bytes for sh in p.shards) <= 600 * 10**6


def test_plan_command_max_rows_and_dtype(capsys):
    assert main(["plan", "--workload", "dlrmv2", "--strategy", "load", "--shards", "2",
                 "--dtype", "fp16", "--max-rows", "1000"]) == 0
    text = capsys.readouterr().out
    assert "dtype=fp16" in text


def test_plan_command_exits_2_naming_the_table_that_does_not_fit(capsys):
    code = main(["plan", "--workload", "dlrmv2", "--strategy", "table", "--shards", "4",
                 "--shard-memory", "20GiB"])
    err = capsys.readouterr().err
    assert code == 2
    assert "INSUFFICIENT_MEMORY" in err and "'t_cat_" in err and "left in total" in err


def test_plan_command_exits_2_on_a_bad_workload(capsys):
    assert main(["plan", "--workload", "no-such", "--strategy", "load", "--shards", "2"]) == 2
    assert "no-such" in capsys.readouterr().err


def test_recserve_cli_has_the_plan_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "recserve.cli", "plan", "--workload", "tiny", "--strategy", "table", "--shards", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "strategy=table" in result.stdout


def test_sharding_imports_no_torch_ray_grpc_or_cuda():
    code = (
        "import sys, sharding, sharding.planners, sharding.partitioners, sharding.placement, sharding.splitters, "
        "sharding.stats, sharding.checks\n"
        "bad = [m for m in ('torch', 'ray', 'grpc', 'triton', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
