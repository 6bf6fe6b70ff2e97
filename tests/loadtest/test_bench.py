"""The bench harness end to end on the tiny model (seconds per run, 127.0.0.1 only)."""

import csv
import re

import pytest

from loadtest.bench import BenchError, BenchOptions, default_configs, parse_config, read_plan, run_bench


def test_config_names_parse_and_bad_ones_are_refused_by_option_name():
    assert parse_config("monolith") is None
    assert parse_config("capacity-4") == ("capacity", 4)
    for bad in ("table", "rows-2", "table-0", "table-x"):
        with pytest.raises(BenchError, match="--configs"):
            parse_config(bad)
    assert len(default_configs()) == 13
    with pytest.raises(BenchError, match="--rates"):
        BenchOptions(rates=(10, -1))
    with pytest.raises(BenchError, match="--duration"):
        BenchOptions(duration_s=3600)
    with pytest.raises(BenchError, match="--idle-seconds"):
        BenchOptions(idle_s=-1)


def test_bench_against_the_monolith_writes_csv_plot_and_table(tiny_bench_root, bench_package, tiny_options, capsys):
    out = tiny_bench_root / "out-mono"
    opts = tiny_options(
        configs=("monolith",), rates=(20.0, 40.0), duration_s=1.5, closed_concurrency=2, out_dir=out
    )
    rows = run_bench(opts)
    assert [(r.mode, r.offered_rps if r.mode == "open" else r.concurrency) for r in rows] == [
        ("open", 20.0), ("open", 40.0), ("closed", 2),
    ]  # fmt: skip
    for r in rows:
        # the monolith's admission control may shed load (RESOURCE_EXHAUSTED) when this machine
        # is slow at the moment; any other error is a failure
        other_errors = {e.partition(":")[0] for e in r.errors.split(";") if e} - {"RESOURCE_EXHAUSTED"}
        assert r.ok > 0 and not other_errors and r.p50_ms <= r.p95_ms <= r.p99_ms, r.errors
        assert r.cpu_s > 0 and r.cpu_overhead == pytest.approx(1.0)
        assert r.shard_calls_per_req == 0
    with open(out / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    import matplotlib.image

    assert matplotlib.image.imread(out / "p99.png").ndim == 3  # a decodable image
    assert "monolith" in (out / "table.md").read_text()
    for r in rows:  # where the time went, from the server's own stage histograms
        assert all(s in r.stages for s in ("parse", "decode", "coalesce_wait", "tower")), r.stages
    assert "per-stage" in (out / "table.txt").read_text()
    assert "p99 ms" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.ray
def test_bench_runs_one_sharded_configuration_on_ray_serve(tiny_bench_root, bench_package, tiny_options, capsys):
    """One Ray Serve start (about a minute on 2 cores): table-2 next to the monolith."""
    out = tiny_bench_root / "out-sharded"
    opts = tiny_options(
        configs=("monolith", "table-2"), rates=(10.0,), duration_s=2.0, closed_concurrency=0,
        out_dir=out, idle_s=2.0,
    )  # fmt: skip
    rows = run_bench(opts)
    sharded = [r for r in rows if r.config == "table-2"]
    assert len(sharded) == 1 and sharded[0].ok > 0 and sharded[0].errors == ""
    assert sharded[0].shard_calls_per_req == pytest.approx(2.0)  # every tiny request reads every table
    for stage in ("parse", "admission", "coalesce_wait", "batch", "shard-0.lookup", "shard-1.wait", "tower.score", "encode"):
        assert stage in sharded[0].stages, sharded[0].stages  # Ray's metrics of every deployment
    assert sharded[0].internal_bytes_per_req > 0
    assert sharded[0].cpu_s > 0 and sharded[0].cpu_overhead > 0
    # every process's CPU apart, by its deployment, and the share of it that an idle stack burns too
    assert [p.split()[0] for p in sharded[0].cpu_by_process.split("; ")] == ["DenseTower", "Router", "shard-0", "shard-1"]
    idle_line = next(line for line in capsys.readouterr().out.splitlines() if "table-2   idle:" in line)
    assert all(f"{d} " in idle_line for d in ("DenseTower", "Router", "shard-0", "shard-1")), idle_line
    at_rest = float(re.search(r"idle: ([\d.]+) ms of CPU a second", idle_line).group(1))
    assert at_rest > 0, idle_line  # four Ray replicas are never free at rest (~10 ms/s each; 2 s read)
    # the column is that rate over the run's answers per second (not compared with the run's CPU:
    # both are read in 10 ms ticks over seconds, and on a loaded machine either can be the larger)
    assert sharded[0].idle_ms_per_req == pytest.approx(at_rest / sharded[0].throughput_rps, rel=0.01, abs=0.01)
    plan = read_plan(tiny_bench_root / "artifacts" / "tiny-full-fp32" / "packages" / "table-2")
    assert plan.num_shards == 2
