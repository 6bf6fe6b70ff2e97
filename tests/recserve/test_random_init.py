"""Packages with seeded random weights (`recserve export --init random`): valid packages whose
values depend only on the seed, stored in every dtype as a trained export would store them."""

import math

import numpy as np
import pytest
import torch

from kernels.quantize import QUANTIZED, dequantize, error_bound
from recserve.cli import main as cli
from recserve.export import write_package
from recserve.layout import dense_shapes
from recserve.package import ModelPackage
from recserve.planning import plan_workload
from recserve.random_init import RandomRows, export_random_package, random_dense
from recserve.synth import TrafficGenerator


def _tables(pkg: ModelPackage) -> dict[str, torch.Tensor]:
    """Every table of a package, whole, as fp32 (quantized ones dequantized)."""
    parts: dict[str, list] = {}
    for sh in pkg.manifest.plan.shards:
        for s in pkg.load_shard(sh.index):
            w = dequantize(s.weight, s.scale, s.bias, s.dtype, s.dim) if s.dtype in QUANTIZED else s.weight.float()
            parts.setdefault(s.table, []).append((s.row_start, w))
    return {t: torch.cat([w for _, w in sorted(p, key=lambda x: x[0])]) for t, p in parts.items()}


def _export(tiny, path, *, seed=0, dtype="fp32", strategy="load", shards=2, mem=180_000, threads=2):
    plan = plan_workload(tiny, strategy=strategy, num_shards=shards, shard_memory=mem, dtype=dtype)
    return export_random_package(tiny, path, plan=plan, seed=seed, threads=threads, progress=False)


def test_a_random_package_passes_every_check_serving_runs(tmp_path, tiny):
    pkg = ModelPackage.open(_export(tiny, tmp_path / "p").path)
    pkg.verify()
    assert pkg.manifest.name == "tiny-random"
    assert {k: tuple(v.shape) for k, v in pkg.load_dense().items()} == dense_shapes(tiny)
    assert cli(["inspect", str(tmp_path / "p")]) == 0


def test_tables_are_uniform_within_one_over_sqrt_rows_like_torchrec(tmp_path, tiny):
    tables = _tables(ModelPackage.open(_export(tiny, tmp_path / "p").path))
    for t in tiny.tables:
        w, bound = tables[t.name], 1 / math.sqrt(t.rows)
        assert w.shape == (t.rows, t.dim)
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.9 * bound and abs(w.mean()) < 0.1 * bound  # spread over the whole range


def test_dense_layers_get_he_weights_and_torchs_default_biases(tiny):
    dense = random_dense(tiny, seed=0)
    w = dense["dense_arch.model._mlp.0._linear.weight"]  # [16, 4]: U(-sqrt(6/4), sqrt(6/4)), ReLU after
    assert math.sqrt(6 / 4) >= w.abs().max() > 0.8 * math.sqrt(6 / 4)
    w = dense["over_arch.model.1.weight"]  # [1, 16]: the logit, U(-sqrt(3/16), sqrt(3/16))
    assert w.abs().max() <= math.sqrt(3 / 16)
    b = dense["over_arch.model.0._mlp.0._linear.bias"]  # [16], fan_in 18
    assert 1 / math.sqrt(18) >= b.abs().max() > 0.5 / math.sqrt(18)


def test_the_same_seed_gives_the_same_package_whatever_the_threads_and_another_seed_does_not(tmp_path, tiny):
    a = ModelPackage.open(_export(tiny, tmp_path / "a", threads=1).path).manifest
    b = ModelPackage.open(_export(tiny, tmp_path / "b", threads=3).path).manifest
    c = ModelPackage.open(_export(tiny, tmp_path / "c", seed=1).path).manifest
    assert a.files == b.files and a.version == b.version
    assert c.files["dense.safetensors"] != a.files["dense.safetensors"]
    assert all(c.files[f] != a.files[f] for f in a.files if f.startswith("shards/"))


def test_the_values_do_not_depend_on_the_plan(tmp_path, tiny):
    split = _tables(ModelPackage.open(_export(tiny, tmp_path / "split", strategy="capacity", shards=3, mem=130_000).path))
    whole = _tables(ModelPackage.open(_export(tiny, tmp_path / "whole", strategy="singular", shards=1, mem=None).path))
    assert split.keys() == whole.keys()
    for t in split:
        assert torch.equal(split[t], whole[t])


def test_tables_longer_than_a_block_are_drawn_block_by_block_and_sliced_anywhere(tmp_path, tiny):
    """Blocks of 300 rows: a table of 5,000 rows takes 17 blocks, and row-wise slices start
    mid-block; the rows read back are the blocks' rows wherever the slices cut them."""

    class SmallBlocks(RandomRows):
        def block_rows(self, table):
            return 300

        def rows(self, table, start, end):
            j = start // 300
            block = torch.from_numpy(np.random.default_rng([self.seed, j]).random((300, 8), dtype=np.float32))
            return block[start - 300 * j : end - 300 * j]

    source = SmallBlocks(tiny, seed=5)
    plan = plan_workload(tiny, strategy="capacity", num_shards=3, shard_memory=130_000)
    assert any(s.row_start % 300 for sh in plan.shards for s in sh.slices)  # a slice starts mid-block
    out = write_package(tiny, tmp_path / "p", plan=plan, dense=random_dense(tiny, 0), source=source, threads=3,
                        progress=False)
    tables = _tables(ModelPackage.open(out.path))
    for t in tiny.tables:
        expect = torch.cat([source.rows(t.name, a, min(a + 300, t.rows)) for a in range(0, t.rows, 300)])
        assert torch.equal(tables[t.name], expect[:, : t.dim])


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "int4"])
def test_every_dtype_stores_the_same_random_model_within_its_error_bound(tmp_path, tiny, dtype):
    full = _tables(ModelPackage.open(_export(tiny, tmp_path / "fp32").path))
    stored = _tables(ModelPackage.open(_export(tiny, tmp_path / dtype, dtype=dtype).path))
    for t in full:
        assert torch.all((stored[t] - full[t]).abs() <= error_bound(full[t], dtype))


def test_scores_of_a_random_model_are_spread_not_saturated(tmp_path, tiny):
    from serving.engine.local_ranker import LocalRanker

    ranker = LocalRanker.load(_export(tiny, tmp_path / "p").path)
    scores = ranker.score(TrafficGenerator(tiny, seed=3).batch(256))
    assert np.all((scores > 0.05) & (scores < 0.95))
    assert scores.std() > 0.02


def test_the_cli_writes_a_random_package_and_refuses_a_state_dict_beside_init_random(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(["export", "--init", "random", "--seed", "7", "--workload", "tiny", "--dtype", "int8",
                "--strategy", "table", "--shards", "2", "--threads", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GB/s" in text and "peak RSS" in text and "shard 1:" in text
    assert ModelPackage.open(out).manifest.dtype == "int8"
    assert cli(["export", "--init", "random", "--state-dict", "x.pt", "--workload", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "--state-dict" in capsys.readouterr().err
    assert cli(["export", "--workload", "tiny", "--out", str(tmp_path / "y")]) == 2
    assert "--init random" in capsys.readouterr().err
