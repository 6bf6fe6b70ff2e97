"""deploy/'s Prometheus config and Grafana dashboard cover every metric recserve defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def defined_metrics() -> set[str]:
    """Names passed to Counter/Histogram/Gauge in serving/ (deployments and fading)."""
    names = set()
    for path in (ROOT / "serving" / "app" / "deployments.py", ROOT / "serving" / "fading" / "metrics.py"):
        names |= set(re.findall(r'(?:Counter|Histogram|Gauge)\(\s*"(recserve_[a-z_]+)"', path.read_text()))
    return names


def test_the_dashboard_has_a_panel_for_every_recserve_metric():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "recserve_grafana_dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    described = " ".join(p["description"] for p in dashboard["panels"])
    names = defined_metrics()
    assert {"recserve_requests", "recserve_request_ms", "recserve_fading_coverage"} <= names  # the scan works
    for name in names:
        assert name in described, name
        assert re.search(rf"\bray_{name}", exprs) or name.endswith("_per_second"), name  # Ray's export prefix
    assert all(p["datasource"] == "${datasource}" for p in dashboard["panels"])  # as Ray's own dashboards


def test_prometheus_scrapes_rays_service_discovery_file():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/session_latest/prom_metrics_service_discovery.json"]
