"""The served-example log: a sampled fraction of scored requests, written as Parquet off the
request path (the input of the teacher scoring job, serving/teacher.py).

Each server replica (the Router, or the monolith) holds one :class:`ExampleLog`. Its
request-path call, :meth:`ExampleLog.submit`, costs a hash of the request id and, for a
sampled request, a non-blocking append to a bounded queue::

    sampled  = blake2b(seed, request_id) / 2**64 < rate      # same request, same answer
    queue    = bounded in examples; full -> the request is not logged, ``dropped`` += B

A writer thread drains the queue, turns requests into rows (recserve/example_format.py),
and writes one Parquet file per ``rows_per_file`` rows or ``flush_s`` seconds, whichever
comes first. A file is written under a hidden temporary name (``.tmp-...``, which readers
skip) and renamed when complete, so a reader never sees half a file, even after a kill.
Names never collide across replicas or restarts::

    part-<host>-<pid>-<uuid8>-<seq:06d>.parquet

``log_dir`` is a local directory or any pyarrow filesystem URL (``s3://bucket/prefix``,
``gs://...``, ``file:///...``). Metrics: examples logged, examples dropped, files and bytes
written (plain counters in :meth:`stats`, and Ray metrics when running inside Ray).
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from recserve.batch import Batch
from recserve.example_format import batch_table, log_schema, open_dir, write_atomic

@dataclass(frozen=True, kw_only=True)
class ExampleLogConfig:
    rate: float = 0.0  # in [0, 1]: fraction of requests logged (0 = off)
    log_dir: str = ""  # local directory or pyarrow filesystem URL
    seed: int = 0  # seed of the sampling hash (two servers with one seed sample the same requests)
    rows_per_file: int = 65_536  # a file is written when this many rows are waiting ...
    flush_s: float = 10.0  # ... or when the oldest waiting row is this old, seconds
    max_queued_examples: int = 65_536  # queue bound; beyond it requests are dropped, not logged

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"log_rate: must be in [0, 1], got {self.rate!r}")
        if self.rate > 0 and not self.log_dir:
            raise ValueError("log_dir: required when log_rate > 0")
        if self.rows_per_file <= 0 or self.max_queued_examples <= 0 or self.flush_s <= 0:
            raise ValueError("rows_per_file, max_queued_examples and flush_s must be positive")


def sampled(request_id: str, rate: float, seed: int = 0) -> bool:
    """Whether a request is logged: a seeded hash of its id against ``rate`` (deterministic)."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    h = hashlib.blake2b(request_id.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") < rate * 2.0**64


def content_id(batch: Batch) -> str:
    """The sampling key of a request sent without a request id: a digest of its dense features."""
    return "content:" + hashlib.blake2b(batch.dense.tobytes(), digest_size=8).hexdigest()


def _faded_features(fades: dict | None, model: str, batch: Batch, request_id: str) -> list[list[str]] | None:
    """Per example, the features fading removed (recomputed from the fades in force when the
    request was served: fading's decision is a pure function of unit, model and fade)."""
    if not fades:
        return None
    from serving.fading.policy import FADED, cohorts, request_units

    units = batch.unit_ids if batch.unit_ids is not None else request_units(batch.batch_size, request_id)
    out: list[list[str]] = [[] for _ in range(batch.batch_size)]
    for feature, fade in fades.items():
        for i in np.flatnonzero(cohorts(units, model, fade) == FADED).tolist():
            out[i].append(feature)
    return out


@dataclass(frozen=True)
class _Item:
    request_id: str
    batch: Batch
    scores: np.ndarray
    at: float
    fades: dict | None


class _RayCounters:
    """The counters as Ray metrics (when in a Ray worker); pushed by the writer thread."""

    def __init__(self):
        from ray.util.metrics import Counter

        self.c = {k: Counter(f"recserve_log_{k}", description=d) for k, d in (
            ("examples_logged", "served examples written to the example log"),
            ("examples_dropped", "sampled examples not logged because the log queue was full"),
            ("bytes_written", "bytes of example log files written"),
        )}
        self.sent = dict.fromkeys(self.c, 0)

    def push(self, stats: dict[str, int]) -> None:
        for k, counter in self.c.items():
            if stats[k] > self.sent[k]:
                counter.inc(stats[k] - self.sent[k])
                self.sent[k] = stats[k]


class ExampleLog:
    """One replica's log writer. ``submit`` never blocks and never raises."""

    def __init__(self, config: ExampleLogConfig, *, model: str, version: str, features: tuple[str, ...],
                 filesystem: pafs.FileSystem | None = None, clock: Callable[[], float] = time.time):
        self.config = config
        self.model, self.version, self.features = model, version, tuple(features)
        self.clock = clock
        if filesystem is None:
            self.fs, self.dir = open_dir(config.log_dir)
        else:
            self.fs, self.dir = filesystem, config.log_dir.rstrip("/")
        self.fs.create_dir(self.dir, recursive=True)
        self.schema = log_schema(self.features)
        self._prefix = f"part-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued = 0  # examples in the queue
        self._cv = threading.Condition()
        self._closing = False
        self.examples_logged = 0
        self.examples_dropped = 0
        self.requests_dropped = 0
        self.files_written = 0
        self.bytes_written = 0
        self.write_errors = 0
        self._ray = None
        try:
            import ray

            if ray.is_initialized():
                self._ray = _RayCounters()
        except Exception:  # noqa: BLE001  metrics are optional
            self._ray = None
        self._thread = threading.Thread(target=self._run, name="recserve-example-log", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, ExampleLog._close_at_exit, weakref.ref(self))
        atexit.register(self._finalizer)

    @staticmethod
    def _close_at_exit(ref) -> None:
        log = ref()
        if log is not None:
            log.close()

    # ---- request path -------------------------------------------------------------------

    def submit(self, request_id: str, batch: Batch, scores: np.ndarray, feature_filter=None) -> bool:
        """Queue a scored request if it is sampled and there is room; True if queued.

        ``feature_filter``: the server's filter; when it is fading, the fades in force now
        are kept with the request so the writer can record what was faded."""
        if not sampled(request_id or content_id(batch), self.config.rate, self.config.seed):
            return False
        fades = getattr(feature_filter, "_fades", None)  # fading swaps this dict whole: a snapshot
        b = batch.batch_size
        with self._cv:
            if self._closing or self._queued + b > self.config.max_queued_examples:
                self.examples_dropped += b
                self.requests_dropped += 1
                return False
            self._queue.append(_Item(request_id, batch, scores, self.clock(), fades))
            self._queued += b
            self._cv.notify()
        return True

    # ---- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        pending: list[pa.Table] = []
        rows, oldest = 0, None
        while True:
            with self._cv:
                timeout = None if oldest is None else max(0.0, oldest + self.config.flush_s - time.monotonic())
                if not self._queue and not self._closing:
                    self._cv.wait(timeout)
                items = list(self._queue)
                self._queue.clear()
                self._queued = 0
                closing = self._closing
            for it in items:
                try:
                    faded = _faded_features(it.fades, self.model, it.batch, it.request_id)
                    pending.append(batch_table(it.batch, it.scores, request_id=it.request_id, logged_at=it.at,
                                               model=self.model, version=self.version, features=self.features,
                                               faded=faded))
                    rows += it.batch.batch_size
                    oldest = oldest if oldest is not None else time.monotonic()
                except Exception as e:  # noqa: BLE001  a bad item is counted, never fatal
                    self.write_errors += 1
                    print(f"recserve example log: dropped a request that could not be logged: {e}", flush=True)
                while rows >= self.config.rows_per_file:
                    pending, rows = self._write(pending, self.config.rows_per_file)
                    oldest = time.monotonic() if rows else None
            due = oldest is not None and time.monotonic() - oldest >= self.config.flush_s
            if rows and (due or closing):
                pending, rows = self._write(pending, rows)
                oldest = None
            if self._ray is not None:
                self._ray.push(self.stats())
            if closing:
                with self._cv:
                    if not self._queue:
                        return

    def _write(self, pending: list[pa.Table], n: int) -> tuple[list[pa.Table], int]:
        """Write the first ``n`` pending rows as one file; returns what is left."""
        table = pa.concat_tables(pending)
        head, rest = table.slice(0, n), table.slice(n)
        name = f"{self._prefix}-{self._seq:06d}.parquet"
        self._seq += 1
        try:
            self.bytes_written += write_atomic(self.fs, self.dir, name, head)
            self.files_written += 1
            self.examples_logged += head.num_rows
        except Exception as e:  # noqa: BLE001  storage trouble: count, report, keep serving
            self.write_errors += 1
            self.examples_dropped += head.num_rows
            print(f"recserve example log: writing {self.dir}/{name} failed: {e}", flush=True)
        return ([rest] if rest.num_rows else []), rest.num_rows

    # ---- control ------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {"examples_logged": self.examples_logged, "examples_dropped": self.examples_dropped,
                "requests_dropped": self.requests_dropped, "files_written": self.files_written,
                "bytes_written": self.bytes_written, "write_errors": self.write_errors}

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued, then stop the writer (idempotent)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout_s)


class NoLog:
    """The log when ``log_rate`` is 0: ``submit`` does nothing."""

    config = ExampleLogConfig()

    def submit(self, request_id, batch, scores, feature_filter=None) -> bool:
        return False

    def stats(self) -> dict[str, int]:
        return {}

    def close(self, timeout_s: float = 0.0) -> None:
        pass


OFF = NoLog()


def example_log_for(config: ExampleLogConfig, manifest) -> ExampleLog | NoLog:
    """The log of a server replica serving ``manifest`` (``OFF`` when the rate is 0)."""
    if config.rate <= 0.0:
        return OFF
    return ExampleLog(config, model=manifest.name, version=manifest.version,
                      features=tuple(manifest.served_features))


def config_of(args) -> ExampleLogConfig:
    """The log settings of an :class:`serving.config.AppArgs` (its ``log_*`` fields)."""
    return ExampleLogConfig(rate=args.log_rate, log_dir=args.log_dir, flush_s=args.log_flush_s,
                            rows_per_file=args.log_rows_per_file, max_queued_examples=args.log_max_queued)
