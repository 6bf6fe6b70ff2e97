"""Students with an auxiliary head and a student adapter: the loss is what the design says,
the served head learns from labels only, and the saved student is a plain package model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recserve.distill import DistillConfig, Student, StudentAdapter, TrainingSet, distill_loss, train_student
from recserve.model import build_model, to_kjt
from recserve.synth import ClickModel, TrafficGenerator

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


def _heads(student: Student, tiny, batch):
    return student(torch.from_numpy(batch.dense), to_kjt(batch, tiny.features))


def test_aux_weight_zero_is_the_label_loss_alone(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny, "mlp")
    main, aux = _heads(student, tiny, batch)
    loss, parts = distill_loss(main, aux, y, t, age, has, student.adapter, DistillConfig(aux_weight=0.0))
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(main, y))
    assert set(parts) == {"label"}


def test_aux_head_without_adapter_learns_the_teacher_score(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny, "none")
    main, aux = _heads(student, tiny, batch)
    loss, _ = distill_loss(main, aux, y, t, age, has, student.adapter, DistillConfig(aux_weight=0.5, adapter="none"))
    want = F.binary_cross_entropy_with_logits(main, y) + 0.5 * F.binary_cross_entropy_with_logits(aux, torch.sigmoid(t))
    torch.testing.assert_close(loss, want)


def test_plain_distillation_puts_the_teacher_on_the_main_head(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny, "none")
    main, aux = _heads(student, tiny, batch)
    cfg = DistillConfig(aux_weight=2.0, adapter="none", distill_head="main")
    loss, _ = distill_loss(main, aux, y, t, age, has, student.adapter, cfg)
    want = F.binary_cross_entropy_with_logits(main, y) + 2.0 * F.binary_cross_entropy_with_logits(main, torch.sigmoid(t))
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("adapter", ["affine", "mlp"])
def test_the_adapter_is_fit_to_labels_and_the_aux_head_follows_it(tiny, inputs, adapter) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny, adapter)
    torch.testing.assert_close(student.adapter(t, age), t)  # starts as the identity
    with torch.no_grad():  # move it off the identity
        for p in student.adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    main, aux = _heads(student, tiny, batch)
    loss, parts = distill_loss(main, aux, y, t, age, has, student.adapter, DistillConfig(aux_weight=1.0, adapter=adapter))
    adapted = student.adapter(t, age)
    fit = F.binary_cross_entropy_with_logits(adapted, y)
    want = (F.binary_cross_entropy_with_logits(main, y) + fit
            + F.binary_cross_entropy_with_logits(aux, torch.sigmoid(adapted).detach()))
    torch.testing.assert_close(loss, want)
    # the adapter learns from labels only (the aux target is detached)
    loss.backward()
    got = [p.grad.clone() for p in student.adapter.parameters()]
    student.zero_grad()
    F.binary_cross_entropy_with_logits(student.adapter(t, age), y).backward()
    for g, p in zip(got, student.adapter.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_the_served_head_gets_gradient_from_labels_only(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny, "mlp")
    head = student.model.over_arch.model[1]
    main, aux = _heads(student, tiny, batch)
    distill_loss(main, aux, y, t, age, has, student.adapter, DistillConfig(aux_weight=5.0))[0].backward()
    with_teacher = [p.grad.clone() for p in head.parameters()]
    trunk = student.model.over_arch.model[0]
    trunk_with = [p.grad.clone() for p in trunk.parameters()]
    student.zero_grad()
    main, _ = _heads(student, tiny, batch)
    F.binary_cross_entropy_with_logits(main, y).backward()
    for g, p in zip(with_teacher, head.parameters()):
        torch.testing.assert_close(g, p.grad)
    # ... while the shared layers below it do learn from the teacher
    assert any(not torch.allclose(g, p.grad) for g, p in zip(trunk_with, trunk.parameters()))


def test_examples_without_a_teacher_score_only_count_for_their_label(tiny, inputs) -> None:
    batch, y, t, age, has = inputs
    student = Student(tiny, "none")
    main, aux = _heads(student, tiny, batch)
    has = torch.arange(B) < 10
    t_other = t.clone()
    t_other[10:] = 100.0  # whatever is there is ignored
    cfg = DistillConfig(aux_weight=1.0, adapter="none")
    a, _ = distill_loss(main, aux, y, t, age, has, student.adapter, cfg)
    b, _ = distill_loss(main, aux, y, t_other, age, has, student.adapter, cfg)
    torch.testing.assert_close(a, b)
    want = F.binary_cross_entropy_with_logits(main, y) + F.binary_cross_entropy_with_logits(aux[:10], torch.sigmoid(t[:10]))
    torch.testing.assert_close(a, want)


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


def test_a_bad_adapter_or_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="adapter"):
        DistillConfig(adapter="deep")
    with pytest.raises(ValueError, match="aux_weight"):
        DistillConfig(aux_weight=-1)
    with pytest.raises(ValueError, match="distill_head"):
        DistillConfig(distill_head="both")
    assert StudentAdapter("none")(torch.ones(2), torch.zeros(2)).tolist() == [1.0, 1.0]
