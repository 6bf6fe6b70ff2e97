"""The Router of the Serve app logs the served examples (log_rate 1.0) to Parquet."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from recserve.example_format import table_batch
from recserve.synth import TrafficGenerator


def test_the_router_logs_what_it_served(tmp_path, tiny, tiny_packages, deploy, helpers) -> None:
    client = deploy(tiny_packages("singular-1"), "logged", log_rate=1.0, log_dir=str(tmp_path), log_flush_s=0.2,
                    feature_filter=None)
    batch = TrafficGenerator(tiny, seed=9).batch(13)
    scores = client.predict(batch.dense, helpers.as_sparse(batch), request_id="served-1", timeout=30)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = pq.read_table(tmp_path).sort_by("example_index")
    assert rows["request_id"].to_pylist() == ["served-1"] * 13
    np.testing.assert_array_equal(rows["score"].to_numpy(), scores)
    np.testing.assert_array_equal(table_batch(rows).sparse["item_id"].values, batch.sparse["item_id"].values)


def test_a_graceful_stop_writes_every_queued_row(tmp_path, tiny, tiny_packages, deploy, helpers) -> None:
    """SIGTERM/Ctrl-C of `recserve serve` deletes the app (serve.shutdown): each router replica
    is stopped gracefully and writes what its example log still holds, though the flush
    interval (an hour here) has not come."""
    from ray import serve

    client = deploy(tiny_packages("singular-1"), "logged-stop", log_rate=1.0, log_dir=str(tmp_path),
                    log_flush_s=3600.0, feature_filter=None)
    served = {}
    for i, n in enumerate((5, 1, 17)):
        batch = TrafficGenerator(tiny, seed=20 + i).batch(n)
        served[f"stop-{i}"] = client.predict(batch.dense, helpers.as_sparse(batch), request_id=f"stop-{i}", timeout=30)
    assert not list(tmp_path.glob("part-*.parquet"))  # still queued: an hour to go
    serve.delete("logged-stop")  # blocks until the replicas are gone
    rows = pq.read_table(tmp_path).sort_by([("request_id", "ascending"), ("example_index", "ascending")])
    for request_id, scores in served.items():
        mine = rows.filter(pa.compute.equal(rows["request_id"], request_id))
        np.testing.assert_array_equal(mine["score"].to_numpy(), scores)
    assert rows.num_rows == sum(len(s) for s in served.values())
