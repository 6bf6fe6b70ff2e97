import math

import numpy as np

from loadtest.driver import RunRecord
from loadtest.report import format_table, plot_p99, read_csv, write_csv
from loadtest.stats import summarize


def _rows():
    rows = []
    for cfg, scale in (("monolith", 1.0), ("table-2", 1.5)):
        for rate in (10.0, 20.0):
            n = 20
            lat = np.linspace(0.005, 0.02, n) * scale * rate / 10
            run = RunRecord(
                mode="open", offered_rps=rate, concurrency=None, wall_s=2.0, scheduled_s=np.zeros(n),
                latency_s=lat, service_s=lat, codes=("OK",) * n, trace_index=np.zeros(n, np.int64),
                request_bytes=np.full(n, 2048), response_bytes=np.full(n, 64),
            )  # fmt: skip
            rows.append(summarize(cfg, run, cpu_s=0.1 * scale))
    return rows


def test_csv_round_trips_every_row(tmp_path):
    rows = _rows()
    back = read_csv(write_csv(rows, tmp_path / "b.csv"))
    assert [r.config for r in back] == [r.config for r in rows]
    for a, b in zip(rows, back):
        assert math.isclose(a.p99_ms, b.p99_ms, rel_tol=1e-5)
        assert math.isnan(b.cpu_overhead) and b.ok == a.ok


def test_plot_is_a_png_with_one_line_per_configuration(tmp_path):
    path = plot_p99(_rows(), tmp_path / "p99.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000


def test_table_lists_every_configuration_and_rate():
    text = format_table(_rows())
    assert text.count("monolith") == 2 and text.count("table-2") == 2
    md = format_table(_rows(), markdown=True)
    assert md.splitlines()[0].startswith("| config") and len(md.splitlines()) == 6
