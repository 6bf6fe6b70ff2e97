"""ExFM students (issue 20): the world has something for the auxiliary head (AH) and the student
adapter (SA) to fix; the serving tower learns from labels only; the AH is a tower of its own
whose gradient into the shared layers is scaled; the SA is updated first and its post-update,
stop-gradient output is an added target; the saved student is a plain package model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recserve.distill import (DistillConfig, Student, StudentAdapter, StudentTrainer, TrainingSet, adapter_step,
                              distill_loss, train_student)
from recserve.model import build_model, predict, to_kjt
from recserve.synth import ClickModel, ExFMWorld, TrafficGenerator, snapshot_of, world_ceilings
from recserve.train import normalized_entropy

B = 32


@pytest.fixture
def inputs(tiny):
    torch.manual_seed(0)
    batch = TrafficGenerator(tiny, seed=1).batch(B)
    y = torch.from_numpy(ClickModel(tiny).labels(batch, np.random.default_rng(0)))
    teacher = torch.randn(B)
    age = torch.full((B,), 3.0)
    has = torch.ones(B, dtype=torch.bool)
    return batch, y, teacher, age, has


def _heads(student: Student, tiny, batch, scale: float = 1.0):
    return student(torch.from_numpy(batch.dense), to_kjt(batch, tiny.features), aux_grad_scale=scale)


def bce(x, t):
    return F.binary_cross_entropy_with_logits(x, t)


# --- the world -----------------------------------------------------------------------------------------------


def test_the_world_leaves_each_mechanism_at_least_001_ne_to_gain(tiny) -> None:
    """The power check: the best pooled teacher there is, recalibrated per vertical (what AH can
    keep out of the serving tower) and with its snapshot's age too (what SA can reach)."""
    for c in world_ceilings(ExFMWorld(tiny, seed=0), days=2, n=6_000):
        assert c["ah_ceiling"] >= 0.01 and c["sa_ceiling"] >= 0.01, c
        assert c["truth"] < c["recalibrated_with_age"] < c["teacher_raw"]
        assert 1.0 <= c["age_min"] < c["age_max"] <= 4.0


def test_a_pooled_teacher_is_miscalibrated_per_vertical_in_opposite_directions(tiny) -> None:
    world = ExFMWorld(tiny, seed=1)
    batch, _ = world.traffic(0, 10, 20_000)
    pooled = 1 / (1 + np.exp(-world.pooled_logits(batch, 10)))
    gaps = [pooled.mean() - world.probs(batch, v, 10).mean() for v in range(len(world.verticals))]
    assert gaps[1] > 0.05 and gaps[2] < -0.05  # over-predicts the low vertical, under-predicts the high one
    assert abs(gaps[0]) < min(gaps[1], -gaps[2])


def test_the_drift_moves_bias_and_scale_not_only_the_direction(tiny) -> None:
    still = ExFMWorld(tiny, seed=2, rotation=0.0)
    batch, _ = still.traffic(0, 3, 2_000)
    a, b = still.logits(batch, 0, 3), still.logits(batch, 0, 6)
    slope, intercept = np.polyfit(a - a.mean(), b, 1)
    assert slope == pytest.approx(np.exp(3 * still.scale_trend), rel=1e-6)  # a stale logit is off by an affine map
    assert intercept > a.mean()


def test_snapshots_give_each_log_time_the_newest_published_one() -> None:
    end, age = snapshot_of(np.array([9.5, 10.0, 12.9, 13.2]), snapshot_every=3, delay=1.0)
    assert end.tolist() == [6, 9, 9, 12]
    np.testing.assert_allclose(age, [3.5, 1.0, 3.9, 1.2])
    with pytest.raises(ValueError, match="no teacher snapshot"):
        snapshot_of(np.array([2.0]), snapshot_every=3, delay=1.0)


def test_a_student_on_a_stream_of_fresh_examples_beats_no_skill(tiny) -> None:
    world = ExFMWorld(tiny, seed=3)
    rng = np.random.default_rng(0)
    stream = []
    for d in range(9, 11):
        b, _ = world.traffic(1, d, 10_000)
        y = world.labels(b, 1, d, rng)
        stream.append(TrainingSet(batch=b, labels=y, teacher=np.zeros(len(y), np.float32),
                                  has_teacher=np.zeros(len(y), bool), age_days=np.zeros(len(y), np.float32)))
    r = train_student(tiny, stream, None, DistillConfig(aux_weight=0.0, adapter="none"), batch_size=512, progress=False)
    assert r.examples == 20_000 and r.steps == 2 * 20
    ev, _ = world.traffic(1, 11, 10_000, stream=3)
    assert normalized_entropy(world.labels(ev, 1, 11, rng), predict(r.model, ev, tiny.features)) < 0.9


# --- the auxiliary head --------------------------------------------------------------------------------------


def test_the_serving_tower_gets_gradient_from_labels_only(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny)
    main, aux = _heads(student, tiny, batch)
    distill_loss(main, aux, y, t, None, has, DistillConfig(aux_weight=5.0, adapter="none"))[0].backward()
    tower = student.model.over_arch
    with_teacher = [p.grad.clone() for p in tower.parameters()]
    shared_with = [p.grad.clone() for p in student.model.dense_arch.parameters()]
    student.zero_grad()
    main, _ = _heads(student, tiny, batch)
    bce(main, y).backward()
    for g, p in zip(with_teacher, tower.parameters()):
        torch.testing.assert_close(g, p.grad)
    # ... while the shared layers below it do learn from the teacher
    assert any(not torch.allclose(g, p.grad) for g, p in zip(shared_with, student.model.dense_arch.parameters()))


@pytest.mark.parametrize("scale", [0.0, 0.25, 3.0])
def test_the_aux_heads_gradient_into_the_shared_layers_is_scaled(tiny, inputs, scale) -> None:
    batch, y, t, age, has = inputs

    def grads(s: float):
        torch.manual_seed(0)
        student = Student(tiny)
        _, aux = _heads(student, tiny, batch, s)
        bce(aux, torch.sigmoid(t)).backward()
        return ([p.grad.clone() for p in student.model.dense_arch.parameters()],
                [p.grad.clone() for p in student.aux_tower.parameters()])

    shared1, tower1 = grads(1.0)
    shared_s, tower_s = grads(scale)
    for a, b in zip(shared1, shared_s):
        torch.testing.assert_close(b, scale * a)
    for a, b in zip(tower1, tower_s):  # the aux tower itself learns at full strength
        torch.testing.assert_close(a, b)


def test_the_aux_head_is_a_tower_of_its_own_shaped_like_the_serving_one(tiny) -> None:
    student = Student(tiny)
    serving = [m for m in student.model.over_arch.modules() if isinstance(m, torch.nn.Linear)]
    aux = [m for m in student.aux_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in aux] == [tuple(m.weight.shape) for m in serving]


def test_the_loss_weight_and_label_scale_shape_the_teachers_target(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny)
    main, aux = _heads(student, tiny, batch)
    cfg = DistillConfig(aux_weight=0.5, adapter="none", label_scale=0.8)
    loss, parts = distill_loss(main, aux, y, t, None, has, cfg)
    torch.testing.assert_close(loss, bce(main, y) + 0.5 * bce(aux, 0.8 * torch.sigmoid(t)))
    assert set(parts) == {"label", "distill"}
    loss, parts = distill_loss(main, aux, y, t, None, has, DistillConfig(aux_weight=0.0))
    torch.testing.assert_close(loss, bce(main, y))
    assert set(parts) == {"label"}


def test_plain_distillation_puts_the_teacher_on_the_serving_tower(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny)
    main, aux = _heads(student, tiny, batch)
    cfg = DistillConfig(aux_weight=2.0, adapter="none", distill_head="main")
    loss, _ = distill_loss(main, aux, y, t, None, has, cfg)
    torch.testing.assert_close(loss, bce(main, y) + 2.0 * bce(main, torch.sigmoid(t)))


def test_examples_without_a_teacher_score_only_count_for_their_label(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny)
    main, aux = _heads(student, tiny, batch)
    has = torch.arange(B) < 10
    t_other = t.clone()
    t_other[10:] = 100.0  # whatever is there is ignored
    cfg = DistillConfig(aux_weight=1.0, adapter="none")
    a, _ = distill_loss(main, aux, y, t, None, has, cfg)
    b, _ = distill_loss(main, aux, y, t_other, None, has, cfg)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, bce(main, y) + bce(aux[:10], torch.sigmoid(t[:10])))


# --- the student adapter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["affine", "mlp"])
def test_the_adapter_starts_as_the_identity_and_learns_from_labels(kind) -> None:
    adapter = StudentAdapter(kind)
    t, age = torch.randn(64), torch.rand(64) * 4
    torch.testing.assert_close(adapter(t, age), t)
    y = (torch.rand(64) < torch.sigmoid(t - 1.5)).float()  # the teacher over-predicts by 1.5 logits
    opt = torch.optim.Adam(adapter.parameters(), lr=0.05)
    for _ in range(60):
        adapter_step(adapter, opt, t, age, y, torch.ones(64, dtype=torch.bool))
    with torch.no_grad():
        assert bce(adapter(t, age), y) < bce(t, y) - 0.05


def test_the_adapter_is_updated_first_and_its_post_update_output_is_an_added_stop_gradient_target(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    cfg = DistillConfig(aux_weight=1.0, adapter="affine", adapter_weight=0.7, adapter_lr=0.1)
    trainer = StudentTrainer(tiny, cfg, seed=0)
    with torch.no_grad():
        trainer.student.adapter.w.copy_(torch.tensor([0.8, 0.1, -0.3, 0.05]))
    before = copy.deepcopy(trainer.student.adapter)
    with torch.no_grad():
        main, aux = _heads(trainer.student, tiny, batch)
    # what the adapter should be after one Adam step on its own loss (labels only)
    expected = copy.deepcopy(before)
    opt = torch.optim.Adam(expected.parameters(), lr=0.1)
    opt.zero_grad()
    bce(expected(t, age), y).backward()
    opt.step()

    parts = trainer.step(batch, y.numpy(), t.numpy(), age.numpy(), has.numpy())

    # stop-gradient: the student's losses moved the adapter no further than its own step
    torch.testing.assert_close(trainer.student.adapter.w, expected.w)
    with torch.no_grad():
        after_target, before_target = torch.sigmoid(expected(t, age)), torch.sigmoid(before(t, age))
        assert parts["adapted"] == pytest.approx(float(bce(aux, after_target)), rel=1e-5)  # the post-update output
        assert parts["adapted"] != pytest.approx(float(bce(aux, before_target)), rel=1e-5)
        assert parts["distill"] == pytest.approx(float(bce(aux, torch.sigmoid(t))), rel=1e-5)  # an added target


def test_adapted_target_adds_to_the_teachers_own_and_carries_no_gradient(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny, "affine")
    main, aux = _heads(student, tiny, batch)
    adapted = student.adapter(t, age) + 0.5  # as if moved, still attached to the adapter's graph
    cfg = DistillConfig(aux_weight=1.0, adapter="affine", adapter_weight=0.3)
    loss, parts = distill_loss(main, aux, y, t, adapted, has, cfg)
    want = bce(main, y) + bce(aux, torch.sigmoid(t)) + 0.3 * bce(aux, torch.sigmoid(adapted.detach()))
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert student.adapter.w.grad is None


# --- what is saved -------------------------------------------------------------------------------------------


def test_the_saved_student_has_the_packages_usual_tensors_only(tmp_path, tiny) -> None:
    from recserve.export import export_package
    from recserve.planning import plan_workload

    batch = TrafficGenerator(tiny, seed=2).batch(300)
    y = ClickModel(tiny).labels(batch, np.random.default_rng(1))
    data = TrainingSet(batch=batch, labels=y, teacher=np.random.default_rng(2).normal(size=300).astype(np.float32),
                       has_teacher=np.ones(300, bool), age_days=np.ones(300, np.float32))
    r = train_student(tiny, data, tmp_path / "student.pt", DistillConfig(adapter="mlp"), progress=False)
    saved = torch.load(r.path, weights_only=True)
    usual = build_model(tiny).state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in usual.items()}
    export_package(tiny, r.path, tmp_path / "pkg", plan=plan_workload(tiny, strategy="singular", num_shards=1),
                   progress=False)


def test_a_bad_config_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="adapter"):
        DistillConfig(adapter="deep")
    with pytest.raises(ValueError, match="aux_weight"):
        DistillConfig(aux_weight=-1)
    with pytest.raises(ValueError, match="grad_scale"):
        DistillConfig(grad_scale=float("nan"))
    with pytest.raises(ValueError, match="label_scale"):
        DistillConfig(label_scale=-0.5)
    with pytest.raises(ValueError, match="distill_head"):
        DistillConfig(distill_head="both")
    with pytest.raises(ValueError, match="aux_tower"):
        DistillConfig(aux_tower=(8, 0))
    assert StudentAdapter("none")(torch.ones(2), torch.zeros(2)).tolist() == [1.0, 1.0]


def test_synth_ceilings_prints_the_power_check_and_refuses_a_bad_workload(capsys) -> None:
    from recserve.cli import main

    assert main(["synth", "ceilings", "--examples", "2000", "--days", "1"]) == 0
    out = capsys.readouterr().out
    assert all(v in out for v in ("v0-typical", "v1-low", "v2-high")) and "AH ceil" in out
    assert main(["synth", "ceilings", "--workload", "no-such-workload"]) == 2
    assert "no-such-workload" in capsys.readouterr().err



def test_synth_ceilings_takes_the_worlds_drift_from_its_flags(tiny, capsys) -> None:
    from recserve.cli import main

    assert main(["synth", "ceilings", "--examples", "1000", "--days", "1", "--first-day", "9", "--snapshot-every", "6",
                 "--bias-trend", "0.3", "--scale-trend", "0", "--rotation", "0.05"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "v1-low" in line)
    want = world_ceilings(ExFMWorld(tiny, seed=0, bias_trend=0.3, scale_trend=0.0, rotation=0.05), snapshot_every=6,
                          first_day=9, days=1, n=1000)[1]
    assert row.split()[2:5] == [f"{want[k]:.4f}" for k in ("teacher_raw", "recalibrated", "recalibrated_with_age")]


def test_synth_labels_draws_the_exfm_worlds_clicks_for_one_verticals_log(tmp_path, tiny, capsys) -> None:
    """A log of v1-low's traffic over days 10 and 11: each example's label is the ExFM world's
    draw for v1-low on the day it was served; a missing or unknown vertical and a day zero that
    leaves the log outside the world's days are refused by name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recserve.cli import main
    from recserve.example_format import batch_table

    day_zero = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    world = ExFMWorld(tiny, seed=3)
    served = [world.traffic(1, day, 300)[0] for day in (10, 11)]
    log = pa.concat_tables([batch_table(b, np.zeros(b.batch_size, np.float32), request_id=f"r{day}",
                                        logged_at=day_zero + (day + 0.4) * 86_400, model="student", version="1",
                                        features=tiny.features) for b, day in zip(served, (10, 11))])
    (tmp_path / "log").mkdir()
    pq.write_table(log, tmp_path / "log" / "part-0.parquet")
    argv = ["synth", "labels", "--logs", str(tmp_path / "log"), "--workload", "tiny", "--world", "exfm",
            "--world-seed", "3", "--seed", "5", "--day-zero", "2026-01-01"]
    assert main([*argv, "--out", str(tmp_path / "labels"), "--vertical", "v1-low"]) == 0
    assert "600 examples labelled by the ExFM world's vertical v1-low on days 10 to 11" in capsys.readouterr().out
    rng = np.random.default_rng(5)
    want = np.concatenate([world.labels(b, 1, day, rng) for b, day in zip(served, (10, 11))])
    got = pq.read_table(tmp_path / "labels")
    np.testing.assert_array_equal(got["label"].to_numpy(), want)
    assert got.num_rows == 600 and 0.02 < want.mean() < 0.5  # v1-low's clicks, not v2-high's
    assert main([*argv, "--out", str(tmp_path / "by-index"), "--vertical", "1"]) == 0
    np.testing.assert_array_equal(pq.read_table(tmp_path / "by-index")["label"].to_numpy(), want)

    for extra, message in ((["--vertical", "v9"], "v9' is none of v0-typical, v1-low, v2-high"),
                           ([], "--vertical: required with --world exfm"),
                           (["--vertical", "v1-low", "--day-zero", "2026-02-01"], "fall on days -21 to -20")):
        capsys.readouterr()
        assert main([*argv, "--out", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_train_commands_teacher_flags_reach_the_trainer(tmp_path, tiny, capsys) -> None:
    """`recserve train --distill` with every AH and SA knob: the trainer reports, from its own
    modules and optimizers, the tower, weights, scales and adapter the flags asked for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recserve.cli import main
    from recserve.example_format import KEY, LABEL, batch_table, example_keys

    batch = TrafficGenerator(tiny, seed=2).batch(64)
    log = batch_table(batch, np.zeros(64, np.float32), request_id="r", logged_at=1_767_225_600.0, model="s",
                      version="1", features=tiny.features)
    keys = pa.array(example_keys(batch), pa.string())
    labels = ClickModel(tiny).labels(batch, np.random.default_rng(0))
    for name, table in (("labels", log.append_column(LABEL, pa.array(labels)).append_column(KEY, keys)),
                        ("scores", pa.table({KEY: keys, "teacher_logit": pa.array(np.zeros(64, np.float32)),
                                             "teacher_snapshot_at": log["logged_at"]}))):
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "part-0.parquet")
    argv = ["train", "--workload", "tiny", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "s.pt"),
            "--batch-size", "32"]
    knobs = ["--aux-weight", "0.5", "--label-scale", "0.8", "--grad-scale", "0.25", "--aux-tower", "12,6",
             "--adapter", "affine", "--adapter-weight", "0.3", "--adapter-lr", "0.05"]
    assert main([*argv, "--distill", str(tmp_path / "scores"), *knobs]) == 0
    out = capsys.readouterr().out
    assert ("tiny student: teacher into auxiliary head (tower 12-6 -> 1), gradient scale 0.25 into the shared "
            "layers; loss weight 0.5, label scale 0.8; adapter affine (loss weight 0.3, lr 0.05)") in out, out
    assert "64 logged examples (64 with a teacher score): 2 steps" in out
    assert main([*argv, "--distill", str(tmp_path / "scores"), "--aux-tower", "", "--adapter", "none"]) == 0
    assert "auxiliary head (tower linear -> 1), gradient scale 1 into the shared layers; loss weight 1, " \
           "label scale 1; no adapter" in capsys.readouterr().out
    assert main([*argv, "--grad-scale", "0.5"]) == 2  # no --distill: the knob would do nothing
    assert "--grad-scale: only with --distill" in capsys.readouterr().err
    assert main(["train", "--workload", "tiny", "--distill", str(tmp_path / "scores"), "--out", "x.pt"]) == 2
    assert "--distill needs --labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--distill", str(tmp_path / "scores"), "--aux-tower", "8,x"])
    assert "not comma-separated widths: '8,x'" in capsys.readouterr().err
