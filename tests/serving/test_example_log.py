"""The served-example log: sampling, a full queue drops instead of blocking, the rows are
the served examples, and files are never half-written, even after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from recserve.example_format import TMP_PREFIX, table_batch
from recserve.synth import TrafficGenerator
from serving.api.client import RankingClient
from serving.example_log import ExampleLog, ExampleLogConfig, sampled
from serving.standalone.monolith import MonolithThread

ROOT = Path(__file__).resolve().parents[2]


def test_sampling_rate_is_within_tolerance_and_the_same_request_always_gets_the_same_answer() -> None:
    ids = [f"req-{i}" for i in range(20_000)]
    for rate in (0.01, 0.1, 0.5):
        got = np.mean([sampled(r, rate) for r in ids])
        sigma = np.sqrt(rate * (1 - rate) / len(ids))
        assert abs(got - rate) < 4 * sigma, (rate, got)
    first = [sampled(r, 0.1, seed=3) for r in ids]
    assert first == [sampled(r, 0.1, seed=3) for r in ids]
    assert first != [sampled(r, 0.1, seed=4) for r in ids]  # the seed picks another sample
    assert not any(sampled(r, 0.0) for r in ids[:100]) and all(sampled(r, 1.0) for r in ids[:100])


class StalledStore(pafs.FSSpecHandler):
    """A local filesystem whose writes wait until ``release`` is set (a stalled object store)."""

    def __init__(self):
        super().__init__(fsspec.filesystem("file"))
        self.release = threading.Event()

    def open_output_stream(self, path, metadata):
        self.release.wait()
        return super().open_output_stream(path, metadata)


def _rows(directory: Path):
    files = sorted(p for p in directory.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))
    return pq.read_table(files) if files else None


def test_a_full_queue_drops_and_counts_and_never_blocks_serving(tmp_path, tiny, tiny_packages, helpers) -> None:
    store = StalledStore()
    log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=str(tmp_path), rows_per_file=8, max_queued_examples=40,
                                      flush_s=0.05),
                     model="tiny", version="v", features=tiny.features, filesystem=pafs.PyFileSystem(store))
    gen = TrafficGenerator(tiny, seed=5)
    sent = 0
    with MonolithThread(tiny_packages("singular-1"), example_log=log) as running:
        client = RankingClient(f"127.0.0.1:{running.port}")
        for i in range(30):  # the writer is stuck on its first file the whole time
            b = gen.batch(10)
            scores = client.predict(b.dense, helpers.as_sparse(b), request_id=f"r{i}", timeout=30)
            assert scores.shape == (10,)
            sent += 10
        client.close()
        stats = log.stats()
        assert stats["examples_dropped"] > 0 and stats["examples_logged"] == 0
        store.release.set()
        log.close()
    stats = log.stats()
    assert stats["examples_logged"] + stats["examples_dropped"] == sent
    assert _rows(tmp_path).num_rows == stats["examples_logged"] > 0


def test_logged_rows_are_the_served_examples_and_scores(tmp_path, tiny, tiny_packages, helpers) -> None:
    log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=str(tmp_path), rows_per_file=50),
                     model="tiny", version="v1", features=tiny.features)
    gen = TrafficGenerator(tiny, seed=6)
    sent = {}
    with MonolithThread(tiny_packages("table-2"), example_log=log) as running:
        client = RankingClient(f"127.0.0.1:{running.port}")
        for i in range(6):
            b = helpers.with_weights(gen.batch(17)) if i == 0 else gen.batch(17)
            rid = f"req-{i}"
            sent[rid] = (b, client.predict(b.dense, helpers.as_sparse(b), unit_ids=b.unit_ids, request_id=rid))
        client.close()
        log.close()
    rows = _rows(tmp_path)
    assert rows.num_rows == 6 * 17 and log.stats()["files_written"] == 3  # 102 rows: 50 + 50 + 2
    for rid, (b, scores) in sent.items():
        mine = rows.filter(pc.equal(rows["request_id"], rid)).sort_by("example_index")
        got = table_batch(mine)
        np.testing.assert_array_equal(got.dense, b.dense)
        np.testing.assert_array_equal(got.unit_ids, b.unit_ids)
        for f in tiny.features:
            np.testing.assert_array_equal(got.sparse[f].values, b.sparse[f].values)
            np.testing.assert_array_equal(got.sparse[f].lengths, b.sparse[f].lengths)
            assert (got.sparse[f].weights is None) == (b.sparse[f].weights is None)
        np.testing.assert_array_equal(mine["score"].to_numpy(), scores)
        assert set(mine["model"].to_pylist()) == {"tiny"} and set(mine["model_version"].to_pylist()) == {"v1"}


def test_the_features_fading_removed_are_recorded_per_example(tmp_path, tiny) -> None:
    from serving.fading import schedule as sched
    from serving.fading.policy import FADED
    from serving.fading.runtime import FadingFilter
    from serving.fading.store import FadingStore

    store = FadingStore(tmp_path / "fading.sqlite")
    store.transition("tiny", "category", lambda s: sched.set_coverage(s, 0.5, 0.0), action="set_coverage",
                     actor="test", now=0.0)
    fading = FadingFilter("tiny", store, background=False)
    log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=str(tmp_path / "log")), model="tiny", version="v",
                     features=tiny.features)
    batch = TrafficGenerator(tiny, seed=8).batch(64)
    faded = fading(batch)
    log.submit("r", batch, np.zeros(64, np.float32), fading)
    log.close()
    rows = _rows(tmp_path / "log").sort_by("example_index")
    want = [["category"] if c == FADED else [] for c in faded.decision.cohorts["category"]]
    assert rows["faded"].to_pylist() == want and 0 < sum(map(len, want)) < 64
    # the features are logged as sent, before fading
    np.testing.assert_array_equal(table_batch(rows).sparse["category"].values, batch.sparse["category"].values)
    fading.close()


WRITER = """
import sys, numpy as np
from recserve.synth import TrafficGenerator
from recserve.workloads import load_workload
from serving.example_log import ExampleLog, ExampleLogConfig
w = load_workload("tiny")
log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=sys.argv[1], rows_per_file=4096, flush_s=0.01),
                 model="tiny", version="v", features=w.features)
gen = TrafficGenerator(w, seed=1)
batches = [gen.batch(512) for _ in range(8)]
i = 0
while True:
    b = batches[i % 8]
    while not log.submit(f"r{i}", b, np.zeros(512, np.float32)):
        pass  # queue full: try again (this writer wants every row)
    i += 1
"""


def test_files_are_complete_or_absent_after_the_writer_is_killed(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("part-*.parquet"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    files = [p for p in tmp_path.iterdir() if not p.name.startswith(TMP_PREFIX)]
    assert len(files) >= 6
    rows = []
    for p in files:  # every visible file is whole: footer, every row group, whole requests of 512 rows
        n = pq.read_table(p).num_rows  # 4096, or fewer when the writer fell behind and flushed on time
        assert 0 < n <= 4096 and n % 512 == 0, (p.name, n)
        rows.append(n)
    # a reader of the directory skips the writer's temporary file (hidden name)
    assert pq.read_table(tmp_path).num_rows == sum(rows)


def test_a_log_rate_without_a_log_dir_is_refused() -> None:
    from serving.config import AppArgs

    with pytest.raises(ValueError, match="log_dir"):
        AppArgs(log_rate=0.1)
    with pytest.raises(ValueError, match="log_rate"):
        ExampleLogConfig(rate=1.5, log_dir="x")
