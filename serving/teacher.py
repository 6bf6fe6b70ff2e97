"""The teacher scoring job: every unique logged example scored once by a teacher package,
on Ray Data (``recserve teacher score``).

    read_parquet(logs) -> key (hash of features) -> dedupe (one actor, knows earlier runs)
                       -> Teacher actors (LocalRanker: shards + tower of the package, GPU if any)
                          each scored batch written as one Parquet file (temp name + rename)

Output rows::

    example_key          string                the features' key (recserve.example_format.example_keys)
    teacher_logit        float32
    teacher_prob         float32               sigmoid(teacher_logit)
    teacher_model        string                the package's model name ...
    teacher_version      string                ... and version: the teacher's snapshot id
    teacher_snapshot_at  timestamp[us, UTC]    when the snapshot was taken (its training data end)
    scored_at            timestamp[us, UTC]
    teacher_pooled       list<float32>         [F * D] pooled embeddings, only with --embeddings (LoopFM)

Dedupe is across files and across runs: keys already in ``out`` for this teacher version
are skipped, so a rerun after a crash scores only what no finished file holds (a file is
visible only once complete). One row of the log may repeat an example another row holds
(same features): it is scored once.

The report times the scoring apart from the start-up: start-up runs from the job's start
(Ray's included) until the first batch reaches a teacher actor; scoring from then until the
last batch is written. examples/s is over the scoring time; the whole job's rate is beside it.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recserve.example_format import (KEY, example_keys, logged_features, open_dir, parquet_files, table_batch,
                                     write_atomic)
from serving.engine.in_process_teacher import InProcessTeacher, ranker_logits  # noqa: F401 (the job's scoring path)

STATUS = "_status"  # set by the dedupe step: NEW, DUPLICATE (seen in this run), DONE (an earlier run)
NEW, DUPLICATE, DONE = 0, 1, 2


@dataclass(frozen=True, kw_only=True)
class ScoreReport:
    examples: int  # rows read from the log
    scored: int  # unique examples scored now
    duplicates: int  # rows whose features an earlier row of this run already had
    already_scored: int  # rows scored by an earlier run of this teacher version
    files: int  # score files written
    seconds: float  # the whole job: Ray's start, Ray Data's pipeline, the scoring, Ray's shutdown
    startup_s: float  # from the job's start until the first batch reached a teacher actor: Ray's start,
    #                   reading, keying and dedupe of the first batch, the actors' start and package load
    scoring_s: float  # from the first batch a teacher actor took to the last one it finished (its clock)

    @property
    def examples_per_s(self) -> float:
        """Logged examples through the teacher per second of scoring, start-up left out."""
        return self.examples / self.scoring_s if self.scoring_s > 0 else float("nan")

    @property
    def overall_examples_per_s(self) -> float:
        """Logged examples per second of the whole job, start-up included."""
        return self.examples / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (f"{self.examples:,} logged examples: {self.scored:,} unique scored, {self.duplicates:,} duplicates "
                f"skipped, {self.already_scored:,} already scored by an earlier run; {self.files} file(s) written\n"
                f"scoring {self.scoring_s:.2f}s ({self.examples_per_s:,.0f} examples/s) after a start-up of "
                f"{self.startup_s:.1f}s (Ray, Ray Data's pipeline, the teacher's load); "
                f"{self.seconds:.1f}s in all ({self.overall_examples_per_s:,.0f} examples/s start-up included)")


def output_schema(with_embeddings: bool) -> pa.Schema:
    ts = pa.timestamp("us", tz="UTC")
    fields = [pa.field(KEY, pa.string()), pa.field("teacher_logit", pa.float32()),
              pa.field("teacher_prob", pa.float32()), pa.field("teacher_model", pa.string()),
              pa.field("teacher_version", pa.string()), pa.field("teacher_snapshot_at", ts),
              pa.field("scored_at", ts)]
    if with_embeddings:
        fields.append(pa.field("teacher_pooled", pa.list_(pa.float32())))
    return pa.schema(fields)


def scored_keys(out: str, version: str) -> set[str]:
    """Keys already scored by teacher ``version`` in ``out`` (complete files only)."""
    fs, files = parquet_files(out)
    keys: set[str] = set()
    for f in files:
        t = pq.read_table(f, columns=[KEY, "teacher_version"], filesystem=fs)
        keys.update(t.filter(pc.equal(t["teacher_version"], version))[KEY].to_pylist())
    return keys


def _ts(seconds: float, n: int) -> pa.Array:
    return pa.array(np.full(n, int(seconds * 1e6), np.int64)).cast(pa.timestamp("us", tz="UTC"))


def _add_keys(table: pa.Table) -> pa.Table:
    """The rows with their example key (stateless; runs as Ray tasks)."""
    return table.append_column(KEY, pa.array(example_keys(table_batch(table)), pa.string()))


class _Dedupe:
    """One actor that has seen every key of this run, and knows the keys of earlier runs."""

    def __init__(self, done: set[str]):
        self.done = done
        self.seen: set[str] = set()

    def __call__(self, table: pa.Table) -> pa.Table:
        status = np.empty(table.num_rows, np.int8)
        for i, k in enumerate(table[KEY].to_pylist()):
            if k in self.done:
                status[i] = DONE
            elif k in self.seen:
                status[i] = DUPLICATE
            else:
                status[i] = NEW
                self.seen.add(k)
        return table.append_column(STATUS, pa.array(status))


class _Teacher(InProcessTeacher):
    """Holds the teacher package (shards + tower in this actor) and writes one file per batch."""

    def __init__(self, package: str, out: str, snapshot_at: float, device: str, with_embeddings: bool):
        super().__init__(package, device)
        self.features = tuple(self.manifest.served_features)
        self.fs, self.out = open_dir(out)
        self.fs.create_dir(self.out, recursive=True)
        self.snapshot_at = snapshot_at
        self.with_embeddings = with_embeddings
        self.schema = output_schema(with_embeddings)
        self.prefix = f"scores-{self.manifest.version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.seq = 0

    def table_logits(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Teacher logits float32 [B] and pooled embeddings float32 [B, F, D] of log rows."""
        missing = [f for f in self.features if "ids." + f not in table.schema.names]
        if missing:
            raise ValueError(f"the log has no feature(s) {missing} that teacher {self.manifest.name} needs")
        return ranker_logits(self.ranker, self.spec, table_batch(table, self.features))

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.time()
        status = table[STATUS].to_numpy()
        new = table.filter(pa.array(status == NEW))
        written = 0
        if new.num_rows:
            logits, pooled = self.table_logits(new)
            n = new.num_rows
            cols = [new[KEY], pa.array(logits), pa.array(1.0 / (1.0 + np.exp(-logits.astype(np.float64))), pa.float32()),
                    pa.array([self.manifest.name] * n), pa.array([self.manifest.version] * n),
                    _ts(self.snapshot_at, n), _ts(time.time(), n)]
            if self.with_embeddings:
                flat = pooled.reshape(n, -1)  # [B, F * D]
                offsets = pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32))
                cols.append(pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1))))
            write_atomic(self.fs, self.out, f"{self.prefix}-{self.seq:06d}.parquet",
                         pa.Table.from_arrays(cols, schema=self.schema))
            self.seq += 1
            written = 1
        return pa.table({"scored": [int((status == NEW).sum())], "duplicates": [int((status == DUPLICATE).sum())],
                         "already_scored": [int((status == DONE).sum())], "files": [written],
                         "started": [started], "finished": [time.time()]})


def gpus_per_actor(device: str, actors: int, cluster_gpus: float) -> float:
    """The GPU share each teacher actor asks Ray for: a whole GPU each while there are enough,
    else an equal share, so that every actor of the fixed pool fits (3 actors on 2 GPUs: 0.5
    each) and the pool never waits for GPUs that are not there."""
    if not device.startswith("cuda"):
        return 0.0
    if actors < 1:
        raise ValueError(f"actors: at least 1, got {actors}")
    whole = int(cluster_gpus)
    if whole < 1:
        raise ValueError(f"device {device!r}: the Ray cluster has no GPU (resources: {cluster_gpus:g} GPU); "
                         "score with --device cpu, or on a cluster with a GPU node (--address)")
    return 1.0 if actors <= whole else 1.0 / math.ceil(actors / whole)


def snapshot_time(package: str) -> float:
    """Default snapshot time of a package: when its manifest was written."""
    return os.stat(os.path.join(package, "manifest.json")).st_mtime


def score_logs(
    logs: list[str],
    teacher: str,
    out: str,
    *,
    address: str | None = None,
    batch_size: int = 4096,
    actors: int = 1,
    device: str = "auto",
    snapshot_at: float | None = None,
    with_embeddings: bool = False,
) -> ScoreReport:
    """Score every unique example of ``logs`` not yet scored by this teacher version into ``out``.

    ``address``: a running stack's or cluster's Ray GCS, attached to as ``recserve deploy`` does
    (serving/ops/attach.py: before Ray is imported, so its loopback and token settings hold)."""
    from recserve.package import ModelPackage

    manifest = ModelPackage.open(teacher).manifest  # a bad package fails here, before Ray starts
    files: list[str] = []
    fs = None
    for location in logs:
        fs, found = parquet_files(location)
        files += found
    if not files:
        raise FileNotFoundError(f"no Parquet files under {', '.join(logs)}")
    examples = 0
    for f in files:
        meta = pq.ParquetFile(f, filesystem=fs)
        examples += meta.metadata.num_rows
        missing = [x for x in manifest.served_features if x not in logged_features(meta.schema_arrow)]
        if missing:
            raise ValueError(f"{f}: the log has no feature(s) {missing} that teacher {manifest.name} needs")
    done = scored_keys(out, manifest.version)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0, wall0 = time.perf_counter(), time.time()
    started_ray = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    if started_ray and address:  # a running stack or cluster: loopback kept, fails within seconds naming it
        from serving.ops.attach import attach

        attach(address, who="recserve teacher score",
               runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    import ray
    import ray.data

    if started_ray and not address:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                 num_cpus=max(2, os.cpu_count() or 2))
    try:
        gpus = gpus_per_actor(device, actors, ray.cluster_resources().get("GPU", 0.0))
        ds = ray.data.read_parquet(files, filesystem=fs)
        ds = ds.map_batches(_add_keys, batch_format="pyarrow", batch_size=batch_size, num_cpus=0.5)
        ds = ds.map_batches(_Dedupe, batch_format="pyarrow", batch_size=batch_size, num_cpus=0.25,
                            fn_constructor_kwargs={"done": done}, compute=ray.data.ActorPoolStrategy(size=1))
        ds = ds.map_batches(
            _Teacher, batch_format="pyarrow", batch_size=batch_size,
            fn_constructor_kwargs={"package": os.path.abspath(teacher) if "://" not in teacher else teacher,
                                   "out": out, "device": device, "with_embeddings": with_embeddings,
                                   "snapshot_at": snapshot_time(teacher) if snapshot_at is None else snapshot_at},
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=0.5,
            **({"num_gpus": gpus} if gpus else {}))
        stats = ds.to_arrow_refs()
        tables = [t for t in ray.get(stats) if t.num_rows]
    finally:
        if started_ray:
            ray.shutdown()
    seconds = time.perf_counter() - t0
    if not tables:  # an empty log: no batch reached the teacher
        return ScoreReport(examples=examples, scored=0, duplicates=0, already_scored=0, files=0, seconds=seconds,
                           startup_s=seconds, scoring_s=0.0)
    totals = pa.concat_tables(tables)
    first, last = pc.min(totals["started"]).as_py(), pc.max(totals["finished"]).as_py()
    # The actors' clocks against this process's: one clock for a local Ray; on a cluster, the
    # nodes' clock skew moves both figures by at most that skew.
    startup = min(max(first - wall0, 0.0), seconds)
    return ScoreReport(examples=examples, scored=int(pc.sum(totals["scored"]).as_py()),
                       duplicates=int(pc.sum(totals["duplicates"]).as_py()),
                       already_scored=int(pc.sum(totals["already_scored"]).as_py()),
                       files=int(pc.sum(totals["files"]).as_py()), seconds=seconds, startup_s=startup,
                       scoring_s=last - first)
