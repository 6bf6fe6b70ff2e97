"""The teacher scoring job on Ray Data (one local Ray for the module): every unique logged
example is scored once, with the package's own scores; a rerun resumes and scores nothing twice."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recserve.example_format import KEY, TMP_PREFIX, example_keys
from recserve.synth import TrafficGenerator

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = not ray.is_initialized()  # a worker that already holds the session's Ray reuses it
    if started:
        # address="local": a Ray of its own, never another cluster `ray start` left on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny, tiny_state_dict) -> Path:
    from recserve.export import export_package
    from recserve.planning import plan_workload

    out = tmp_path_factory.mktemp("teacher") / "pkg"
    return export_package(tiny, tiny_state_dict, out, plan=plan_workload(tiny, strategy="table", num_shards=2),
                          progress=False, version="teacher-v1").path


def write_log(directory: Path, tiny, batches: list, rows_per_file: int = 100) -> None:
    from serving.example_log import ExampleLog, ExampleLogConfig

    log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=str(directory), rows_per_file=rows_per_file),
                     model="student", version="s1", features=tiny.features)
    for i, b in enumerate(batches):
        assert log.submit(f"r{i}", b, np.zeros(b.batch_size, np.float32))
    log.close()


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory, tiny, teacher):
    """Log A: 6 requests of 40 examples, the first two sent again (duplicates across files);
    scored once into ``out``, with a half-written score file of a crashed run lying there."""
    from serving.teacher import score_logs

    root = tmp_path_factory.mktemp("teacher-job")
    gen = TrafficGenerator(tiny, seed=3)
    batches = [gen.batch(40) for _ in range(6)]
    write_log(root / "log-a", tiny, batches + batches[:2])
    (root / "out").mkdir()
    (root / "out" / f"{TMP_PREFIX}scores-crashed.parquet").write_bytes(b"PAR1 half a file")
    report = score_logs([str(root / "log-a")], str(teacher), str(root / "out"), batch_size=64)
    return root, batches, report


def test_each_unique_example_is_scored_once_with_the_teacher_packages_scores(first_run, tiny, teacher) -> None:
    from serving.engine.local_ranker import LocalRanker

    root, batches, report = first_run
    assert (report.examples, report.scored, report.duplicates, report.already_scored) == (320, 240, 80, 0)
    scores = pq.read_table(root / "out")
    assert scores.num_rows == 240 and len(set(scores[KEY].to_pylist())) == 240
    assert set(scores["teacher_version"].to_pylist()) == {"teacher-v1"}
    by_key = dict(zip(scores[KEY].to_pylist(), scores["teacher_prob"].to_pylist()))
    logit = dict(zip(scores[KEY].to_pylist(), scores["teacher_logit"].to_pylist()))
    ranker = LocalRanker.load(teacher)
    for b in batches:
        want = ranker.score(b)
        keys = example_keys(b)
        np.testing.assert_allclose([by_key[k] for k in keys], want, atol=1e-6)
        np.testing.assert_allclose(torch.sigmoid(torch.tensor([logit[k] for k in keys])).numpy(), want, atol=1e-6)


def test_the_report_times_the_scoring_apart_from_the_start_up(first_run) -> None:
    _, _, report = first_run
    assert 0 < report.startup_s and 0 < report.scoring_s and report.startup_s + report.scoring_s <= report.seconds
    assert report.examples_per_s == pytest.approx(report.examples / report.scoring_s)
    assert report.overall_examples_per_s == pytest.approx(report.examples / report.seconds)
    assert report.examples_per_s > report.overall_examples_per_s
    text = str(report)
    assert f"scoring {report.scoring_s:.2f}s ({report.examples_per_s:,.0f} examples/s)" in text
    assert f"start-up of {report.startup_s:.1f}s" in text


def test_the_jobs_logits_equal_the_in_process_teachers(first_run, teacher) -> None:
    """Experiments score in-process (no Ray start-up per run): the same logits as the job's."""
    from serving.engine.in_process_teacher import InProcessTeacher

    root, batches, _ = first_run
    scores = pq.read_table(root / "out")
    logit = dict(zip(scores[KEY].to_pylist(), scores["teacher_logit"].to_pylist()))
    local = InProcessTeacher(str(teacher))
    for b in batches:
        np.testing.assert_array_equal(np.array([logit[k] for k in example_keys(b)], np.float32), local.logits(b))


def test_a_rerun_over_more_logs_scores_only_what_no_earlier_run_scored(first_run, tiny, teacher) -> None:
    from serving.teacher import score_logs

    root, batches, _ = first_run
    gen = TrafficGenerator(tiny, seed=4)
    more = [gen.batch(40) for _ in range(2)]
    write_log(root / "log-b", tiny, more + batches[3:4])  # 80 new examples, 40 already scored
    report = score_logs([str(root / "log-a"), str(root / "log-b")], str(teacher), str(root / "out"), batch_size=64)
    assert (report.scored, report.already_scored, report.duplicates) == (80, 360, 0)
    keys = pq.read_table(root / "out")[KEY].to_pylist()
    assert len(keys) == len(set(keys)) == 320


def test_a_teacher_whose_features_the_log_lacks_is_refused_by_name(ray_local, tmp_path, tiny, teacher) -> None:
    import dataclasses

    import ray

    from serving.teacher import score_logs
    from serving.example_log import ExampleLog, ExampleLogConfig

    log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=str(tmp_path / "log")), model="s", version="1",
                     features=tiny.features[:2])  # a student that serves two of the teacher's features
    b = TrafficGenerator(tiny, seed=5).batch(8)
    log.submit("r", dataclasses.replace(b, sparse={f: b.sparse[f] for f in tiny.features[:2]}), np.zeros(8))
    log.close()
    with pytest.raises((ValueError, ray.exceptions.RayError), match="recent_items"):
        score_logs([str(tmp_path / "log")], str(teacher), str(tmp_path / "out"))



@pytest.mark.parametrize("actors, gpus, share", [(1, 1, 1.0), (2, 4, 1.0), (2, 1, 0.5), (3, 2, 0.5), (5, 2, 1 / 3)])
def test_teacher_actors_share_the_gpus_so_that_the_whole_pool_fits(actors, gpus, share) -> None:
    from serving.teacher import gpus_per_actor

    assert gpus_per_actor("cuda", actors, gpus) == pytest.approx(share)
    per_gpu = int(1 / share + 1e-9)
    assert per_gpu * gpus >= actors, "every actor of the fixed pool finds room"
    assert gpus_per_actor("cpu", actors, gpus) == 0.0


def test_a_cuda_teacher_on_a_ray_without_gpus_is_refused_not_left_waiting(first_run, teacher) -> None:
    import ray

    from serving.teacher import score_logs

    if ray.cluster_resources().get("GPU"):
        pytest.skip("this Ray has a GPU")
    root = first_run[0]
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        score_logs([str(root / "log-a")], str(teacher), str(root / "out-cuda"), device="cuda")


@pytest.mark.parametrize("address, says", [("127.0.0.1:{free}", "no Ray GCS answers at 127.0.0.1:{free}"),
                                           ("stack", "recserve serve")])
def test_teacher_score_on_a_stack_that_is_not_there_fails_at_once_naming_it(tmp_path, tiny, teacher, address, says):
    """`recserve teacher score --address` attaches as `recserve deploy` does: a stack that does not
    answer (or no state file for 'stack') is an error within seconds naming what it tried."""
    import subprocess
    import sys

    from serving.ops.ports import free_port

    write_log(tmp_path / "log", tiny, [TrafficGenerator(tiny, seed=6).batch(8)])
    free = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RECSERVE_ARTIFACTS=str(tmp_path / "no-stack"))
    run = subprocess.run([sys.executable, "-m", "recserve.cli", "teacher", "score", "--logs", str(tmp_path / "log"),
                          "--teacher", str(teacher), "--out", str(tmp_path / "out"),
                          "--address", address.format(free=free)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert says.format(free=free) in run.stderr, run.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
