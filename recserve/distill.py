"""Students trained with a teacher's scores (ExFM, arXiv 2502.17494): an auxiliary head and
a student adapter.

The student is the workload's torchrec DLRM / DLRM_DCN. Its shared layers (embeddings, bottom
MLP, interaction) feed two towers::

    x       = inter_arch(dense_arch(dense), sparse_arch(sparse))      # [B, I] shared layers
    main    = over_arch(x)                 # the serving tower: learns from labels only
    aux     = aux_tower(gs(x))             # the auxiliary head (AH): a tower of its own, same shape,
                                           # learns from the teacher; gs scales its gradient into
                                           # the shared layers by grad_scale (identity forward)

Each step, with teacher logit t and snapshot age a (days) of the examples that have a score:

    1. the student adapter (SA) is updated first, on the fresh labels:
           SA <- SA - lr * grad BCE(SA(t, a), y)
    2. its output *after* that update is a stop-gradient target: s = sigmoid(SA(t, a)).detach()
    3. the student is updated on
           BCE(main, y) + w * BCE(head, min(1, label_scale * sigmoid(t))) + w_sa * BCE(head, s)
       head = aux (AH) or main (``distill_head="main"``: plain distillation, the baseline);
       the SA term only with an adapter.

``adapter``: ``none`` (no adapter), ``affine`` ((a0 + a1 age) t + c0 + c1 age), ``mlp``
(t + MLP(t, age)); both start as the identity. ``aux_weight=0`` is the student without the
teacher. Examples without a teacher score contribute only their label loss.

The stored copy of the paper we could search lacked its equations; the choices above follow
its text: the serving head takes labels only, the AH is its own task arch on the shared
layers with a loss weight, a label scale (a multiplier on the teacher's probability) and a
gradient scale into the shared layers; the SA learns to map the FM's prediction to the
VM's fresh labels, is updated before the VM each step, and its stop-gradient prediction is a
second distillation target beside the FM's own.

Only the torchrec model (the serving tower) is saved: the package format is unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from recserve.batch import Batch
from recserve.example_format import KEY, LABEL, example_keys, open_dir, parquet_files, table_batch, write_atomic
from recserve.model import build_model, to_kjt
from recserve.train import optimizers
from recserve.workloads import WorkloadConfig

Adapter = Literal["mlp", "affine", "none"]
DAY_S = 86_400.0
MAX_WORLD_DAY = 1_000  # the ExFM world's last day a log may fall on (its logit scale is e^60 by then)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    aux_weight: float = 1.0  # w: loss weight of the teacher's target (0 = no teacher)
    adapter: Adapter = "mlp"
    distill_head: Literal["aux", "main"] = "aux"
    label_scale: float = 1.0  # the teacher's probability times this is the target (clipped to 1)
    grad_scale: float = 1.0  # AH: its gradient into the shared layers is multiplied by this
    adapter_weight: float | None = None  # w_sa: loss weight of the adapter's target (default: aux_weight)
    adapter_lr: float = 0.01
    aux_tower: tuple[int, ...] | None = None  # the AH tower's hidden widths (None: those of the serving tower)

    def __post_init__(self) -> None:
        for name in ("aux_weight", "label_scale", "grad_scale", "adapter_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.adapter_weight is not None and not self.adapter_weight >= 0:
            raise ValueError(f"adapter_weight: must be >= 0, got {self.adapter_weight}")
        if self.adapter not in ("mlp", "affine", "none"):
            raise ValueError(f"adapter: one of mlp, affine, none, got {self.adapter!r}")
        if self.distill_head not in ("aux", "main"):
            raise ValueError(f"distill_head: aux or main, got {self.distill_head!r}")
        if self.aux_tower is not None and not all(isinstance(w, int) and w > 0 for w in self.aux_tower):
            raise ValueError(f"aux_tower: hidden widths must be positive integers, got {self.aux_tower}")

    @property
    def sa_weight(self) -> float:
        return self.aux_weight if self.adapter_weight is None else self.adapter_weight


class StudentAdapter(torch.nn.Module):
    """Maps (teacher logit, snapshot age in days) to a fresh-label logit; starts as the identity."""

    def __init__(self, kind: Adapter, hidden: int = 16):
        super().__init__()
        self.kind = kind
        if kind == "affine":
            self.w = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # a0, a1, c0, c1
        elif kind == "mlp":
            self.mlp = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
            torch.nn.init.zeros_(self.mlp[2].weight)
            torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """t, age float32 [B] -> adapted logit [B]."""
        if self.kind == "affine":
            a0, a1, c0, c1 = self.w
            return (a0 + a1 * age) * t + c0 + c1 * age
        if self.kind == "mlp":
            return t + self.mlp(torch.stack((t, age), dim=1)).squeeze(1)
        return t


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient backward is multiplied by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else _GradScale.apply(x, scale)


class Student(torch.nn.Module):
    """A torchrec DLRM / DLRM_DCN with an auxiliary tower beside its serving tower, both on the
    shared layers' output (the interaction). ``aux_tower``: the auxiliary tower's hidden widths
    (default: the serving tower's, ``top_mlp`` without its output; () = one linear layer)."""

    def __init__(self, workload: WorkloadConfig, adapter: Adapter = "none", aux_tower: tuple[int, ...] | None = None):
        super().__init__()
        self.model = build_model(workload)
        if aux_tower is None and len(workload.top_mlp) < 2:
            raise ValueError(f"{workload.name}: top_mlp needs a hidden layer for the auxiliary tower")
        width = next(m for m in self.model.over_arch.modules() if isinstance(m, torch.nn.Linear)).in_features
        layers: list[torch.nn.Module] = []
        for h in workload.top_mlp[:-1] if aux_tower is None else aux_tower:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        self.aux_tower = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
        self.adapter = StudentAdapter(adapter)

    def forward(self, dense: torch.Tensor, sparse, aux_grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(serving logit [B], aux logit [B])."""
        m = self.model
        x = m.inter_arch(dense_features=m.dense_arch(dense), sparse_features=m.sparse_arch(sparse))  # [B, I]
        return m.over_arch(x).squeeze(1), self.aux_tower(grad_scale(x, aux_grad_scale)).squeeze(1)


def _masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask).sum() / mask.sum().clamp(min=1.0)


def adapter_step(adapter: StudentAdapter, opt: torch.optim.Optimizer | None, teacher: torch.Tensor, age: torch.Tensor,
                 y: torch.Tensor, has_teacher: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """SA first: one update on the fresh labels, then its output after the update, detached
    (the student's stop-gradient target). (None, nan) without an adapter or a teacher score."""
    if adapter.kind == "none" or opt is None or not bool(has_teacher.any()):
        return None, float("nan")
    mask = has_teacher.float()
    loss = _masked_bce(adapter(teacher, age), y, mask)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        return adapter(teacher, age), float(loss)


def distill_loss(
    main: torch.Tensor,  # [B] serving-tower logits
    aux: torch.Tensor,  # [B] aux-tower logits
    y: torch.Tensor,  # [B] labels
    teacher: torch.Tensor,  # [B] teacher logits (any value where has_teacher is False)
    adapted: torch.Tensor | None,  # [B] the adapter's logits after its update (detached), or None
    has_teacher: torch.Tensor,  # bool [B]
    config: DistillConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's loss (see the module docstring) and its parts."""
    label = F.binary_cross_entropy_with_logits(main, y)
    parts = {"label": float(label.detach())}
    total = label
    if config.aux_weight > 0 and bool(has_teacher.any()):
        mask = has_teacher.float()
        head = aux if config.distill_head == "aux" else main
        soft = torch.clamp(config.label_scale * torch.sigmoid(teacher), max=1.0)
        d = _masked_bce(head, soft, mask)
        total = total + config.aux_weight * d
        parts["distill"] = float(d.detach())
        if adapted is not None and config.sa_weight > 0:
            s = _masked_bce(head, torch.sigmoid(adapted.detach()), mask)
            total = total + config.sa_weight * s
            parts["adapted"] = float(s.detach())
    return total, parts


class StudentTrainer:
    """A student and its optimizers (row-wise Adagrad for the tables, Adam for the rest, Adam for
    the adapter), trained one batch at a time: the adapter first, then the student."""

    def __init__(self, workload: WorkloadConfig, config: DistillConfig, *, seed: int = 0):
        torch.manual_seed(seed)
        self.workload = workload
        self.config = config
        self.student = Student(workload, config.adapter if config.aux_weight > 0 else "none", config.aux_tower)
        tables = optimizers(self.student.model, self.student.model.sparse_arch)[0]  # row-wise Adagrad, sparse grads
        sparse_ids = {id(p) for p in self.student.model.sparse_arch.parameters()}
        dense = [p for n, p in self.student.named_parameters() if not n.startswith("adapter.") and id(p) not in sparse_ids]
        self.opts = (tables, torch.optim.Adam(dense, lr=3e-3))
        adapter_params = list(self.student.adapter.parameters())
        self.adapter_opt = torch.optim.Adam(adapter_params, lr=config.adapter_lr) if adapter_params else None
        self.steps = 0

    def step(self, batch: Batch, labels: np.ndarray, teacher: np.ndarray, age: np.ndarray,
             has_teacher: np.ndarray) -> dict[str, float]:
        y = torch.from_numpy(np.asarray(labels, np.float32))
        t = torch.from_numpy(np.asarray(teacher, np.float32))
        a = torch.from_numpy(np.asarray(age, np.float32))
        has = torch.from_numpy(np.asarray(has_teacher, bool))
        adapted, sa_loss = adapter_step(self.student.adapter, self.adapter_opt, t, a, y, has)
        main, aux = self.student(torch.from_numpy(batch.dense), to_kjt(batch, self.workload.features),
                                 aux_grad_scale=self.config.grad_scale)
        loss, parts = distill_loss(main, aux, y, t, adapted, has, self.config)
        for o in self.opts:
            o.zero_grad()
        loss.backward()
        for o in self.opts:
            o.step()
        self.steps += 1
        if adapted is not None:
            parts["adapter"] = sa_loss
        return parts

    def describe(self) -> str:
        """How the teacher is used, read from the live modules and optimizers (what this trainer runs)."""
        c = self.config
        if c.aux_weight == 0:
            return "no teacher (labels only)"
        widths = [m.out_features for m in self.student.aux_tower if isinstance(m, torch.nn.Linear)][:-1]
        head = (f"auxiliary head (tower {'-'.join(map(str, widths)) or 'linear'} -> 1), gradient scale "
                f"{c.grad_scale:g} into the shared layers" if c.distill_head == "aux" else "the serving head (main)")
        text = f"teacher into {head}; loss weight {c.aux_weight:g}, label scale {c.label_scale:g}"
        if self.adapter_opt is None:
            return text + "; no adapter"
        return (text + f"; adapter {self.student.adapter.kind} (loss weight {c.sa_weight:g}, "
                f"lr {self.adapter_opt.param_groups[0]['lr']:g})")

    def serving_model(self) -> torch.nn.Module:
        """The trained torchrec model (serving tower), dense-gradient tables, eval mode."""
        for bag in self.student.model.sparse_arch.embedding_bag_collection.embedding_bags.values():
            bag.sparse = False
        return self.student.model.eval()


@dataclass(frozen=True, kw_only=True)
class TrainingSet:
    """Labelled logged examples joined with teacher scores."""

    batch: Batch
    labels: np.ndarray  # float32 [N]
    teacher: np.ndarray  # float32 [N] teacher logit (0 where none)
    has_teacher: np.ndarray  # bool [N]
    age_days: np.ndarray  # float32 [N]


def _read(location: str, columns: list[str] | None = None) -> pa.Table:
    fs, files = parquet_files(location)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {location}")
    return pa.concat_tables([pq.read_table(f, filesystem=fs, columns=columns) for f in files],
                            promote_options="default")


def load_training_set(labels: str, scores: str | None, features: tuple[str, ...]) -> TrainingSet:
    table = _read(labels)
    if LABEL not in table.schema.names or KEY not in table.schema.names:
        raise ValueError(f"{labels}: not a labelled log (needs '{LABEL}' and '{KEY}'; see recserve synth labels)")
    n = table.num_rows
    teacher = np.zeros(n, np.float32)
    has = np.zeros(n, bool)
    age = np.zeros(n, np.float32)
    if scores:
        s = _read(scores, [KEY, "teacher_logit", "teacher_snapshot_at"])
        s = s.sort_by([("teacher_snapshot_at", "descending")])  # the newest snapshot wins
        keys = np.asarray(s[KEY].to_pylist(), dtype=object)
        _, first = np.unique(keys, return_index=True)
        index = {k: i for k, i in zip(keys[first].tolist(), first.tolist())}
        logits = s["teacher_logit"].to_numpy()
        snap = pc.cast(s["teacher_snapshot_at"], pa.int64()).to_numpy() / 1e6
        logged = pc.cast(table["logged_at"], pa.int64()).to_numpy() / 1e6
        for i, k in enumerate(table[KEY].to_pylist()):
            j = index.get(k)
            if j is not None:
                teacher[i], has[i], age[i] = logits[j], True, (logged[i] - snap[j]) / DAY_S
    return TrainingSet(batch=table_batch(table, features), labels=table[LABEL].to_numpy().astype(np.float32),
                       teacher=teacher, has_teacher=has, age_days=age)


@dataclass(frozen=True, kw_only=True)
class DistillResult:
    examples: int
    with_teacher: int
    steps: int
    seconds: float
    path: Path | None
    last_loss: dict[str, float]
    model: torch.nn.Module | None = None  # the serving tower, trained
    adapter: StudentAdapter | None = None  # the trained student adapter
    setup: str = ""  # the trainer's own account of how it used the teacher (StudentTrainer.describe)


def train_student(
    workload: WorkloadConfig,
    data: TrainingSet | Iterable[TrainingSet],
    out: Path | None,
    config: DistillConfig,
    *,
    epochs: int = 1,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    init: dict[str, torch.Tensor] | None = None,
) -> DistillResult:
    """Train a student on ``data`` (``epochs`` shuffled passes over one set, or one pass over a
    stream of sets: fresh examples, in their order) and save its serving tower to ``out``
    (unless None). ``init``: a serving-tower state dict to start from (fine-tuning)."""
    trainer = StudentTrainer(workload, config, seed=seed)
    if init is not None:
        trainer.student.model.load_state_dict(init)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    parts: dict[str, float] = {}
    n = with_teacher = 0
    chunks = ([data] * epochs) if isinstance(data, TrainingSet) else data
    bar = tqdm(desc=f"train {workload.name} (distill)", disable=not progress, unit="step")
    for i, chunk in enumerate(chunks):
        m = chunk.labels.shape[0]
        if i == 0 or not isinstance(data, TrainingSet):
            n += m
            with_teacher += int(chunk.has_teacher.sum())
        order = rng.permutation(m) if isinstance(data, TrainingSet) else np.arange(m)
        for start in range(0, m, batch_size):
            idx = order[start:start + batch_size]
            parts = trainer.step(chunk.batch.take(idx), chunk.labels[idx], chunk.teacher[idx], chunk.age_days[idx],
                                 chunk.has_teacher[idx])
            bar.update(1)
    bar.close()
    model = trainer.serving_model()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out)  # the serving tower only: the package's usual tensors
    return DistillResult(examples=n, with_teacher=with_teacher, steps=trainer.steps,
                         seconds=time.perf_counter() - t0, path=out, last_loss=parts, model=model,
                         adapter=trainer.student.adapter, setup=trainer.describe())


@dataclass(frozen=True, kw_only=True)
class LabelReport:
    examples: int  # logged examples labelled
    first_day: int  # the world's days the log's examples fell on (logged_at - day_zero)
    last_day: int


def draw_labels(logs: str, out: str, workload: WorkloadConfig, *, world_seed: int = 0, drift: float = 0.0,
                day_zero: float = 0.0, seed: int = 0, vertical: int | str | None = None) -> LabelReport:
    """Clicks for every logged example from the synthetic world's ground truth at the day it
    was served (``floor((logged_at - day_zero) / 86400)``); writes the log rows plus ``label`` and
    ``example_key`` to ``out``, one file per log file.

    ``vertical`` None: the :class:`~recserve.synth.ClickModel` world (``drift`` radians a day).
    A vertical (name or index): the :class:`~recserve.synth.ExFMWorld`'s truth for that vertical
    (the log is that vertical's student's traffic), its own drift; its days must be 0 to
    ``MAX_WORLD_DAY`` (its logit scale grows e^0.06 a day)."""
    from recserve.synth import ClickModel, ExFMWorld

    fs, files = parquet_files(logs)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {logs}")
    if vertical is None:
        click = ClickModel(workload, seed=world_seed, drift=drift)

        def truth(batch: Batch, day: int, rng: np.random.Generator) -> np.ndarray:
            return click.at(float(day)).labels(batch, rng)
    else:
        if drift:
            raise ValueError("drift: the ExFM world drifts by its own trends (drop drift, or the vertical)")
        world = ExFMWorld(workload, seed=world_seed)
        v = world.vertical_index(vertical)

        def truth(batch: Batch, day: int, rng: np.random.Generator) -> np.ndarray:
            return world.labels(batch, v, day, rng)

    def days_of(t: pa.Table) -> np.ndarray:
        return np.floor((pc.cast(t["logged_at"], pa.int64()).to_numpy() / 1e6 - day_zero) / DAY_S).astype(np.int64)

    spans = [(int(d.min()), int(d.max())) for f in files
             if (d := days_of(pq.read_table(f, filesystem=fs, columns=["logged_at"]))).size]
    lo, hi = (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (0, 0)
    if vertical is not None and (lo < 0 or hi > MAX_WORLD_DAY):
        raise ValueError(f"day_zero: the log's examples fall on days {lo} to {hi} after it; the ExFM world "
                         f"runs from day 0 to {MAX_WORLD_DAY} (set day zero a few days before the log)")
    ofs, odir = open_dir(out)
    ofs.create_dir(odir, recursive=True)
    rng = np.random.default_rng(seed)
    total = 0
    for f in files:
        t = pq.read_table(f, filesystem=fs)
        day = days_of(t)
        batch = table_batch(t, workload.features)
        labels = np.empty(t.num_rows, np.float32)
        for d in np.unique(day):  # one ground truth per day
            rows = np.flatnonzero(day == d)
            labels[rows] = truth(batch.take(rows), int(d), rng)
        keys = example_keys(table_batch(t))
        t = t.append_column(LABEL, pa.array(labels)).append_column(KEY, pa.array(keys, pa.string()))
        write_atomic(ofs, odir, "labels-" + f.rsplit("/", 1)[-1], t)
        total += t.num_rows
    return LabelReport(examples=total, first_day=lo, last_day=hi)
