import math

import numpy as np

from loadtest.driver import RunRecord
from loadtest.report import format_table, p99_figure, plot_p99, read_csv, write_csv
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
    import matplotlib.image
    import matplotlib.pyplot as plt

    rows = _rows()
    fig = p99_figure(rows)
    try:
        lines = fig.axes[0].get_lines()
        assert [line.get_label() for line in lines] == ["monolith", "table-2"]
        for line in lines:
            want = sorted((r.offered_rps, r.p99_ms) for r in rows if r.config == line.get_label())
            np.testing.assert_allclose(np.column_stack(line.get_data()), want)
        width, height = fig.get_size_inches() * fig.dpi
    finally:
        plt.close(fig)
    path = plot_p99(rows, tmp_path / "p99.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (round(height), round(width))  # a whole image, decodable


def test_table_lists_every_configuration_and_rate():
    text = format_table(_rows())
    assert text.count("monolith") == 2 and text.count("table-2") == 2
    md = format_table(_rows(), markdown=True)
    assert md.splitlines()[0].startswith("| config") and len(md.splitlines()) == 6
