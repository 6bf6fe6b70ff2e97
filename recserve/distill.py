"""Students trained with a teacher's scores (ExFM): an auxiliary head and a student adapter.

The student is the workload's torchrec DLRM / DLRM_DCN. Its top MLP's last hidden layer
feeds two heads::

    h    = over_arch.model[0](interaction)          # [B, H] last hidden layer
    main = over_arch.model[1](h)                     # [B, 1] served head: trained on labels only
    aux  = aux_head(h)                               # [B, 1] trained on the adapted teacher score

    adapted = adapter(teacher_logit, age_days)       # trained on labels
    loss = BCE(main, y) + A * BCE(aux, sigmoid(adapted).detach()) + BCE(adapted, y)   (adapter != none)

``adapter``: ``none`` (adapted = teacher logit: plain distillation through the auxiliary head),
``affine`` (adapted = (a + b age) t + c + d age), ``mlp`` (t + MLP(t, age)). ``age_days`` is how
old the teacher's snapshot is when the example was served. ``distill_head="main"`` is the
plain-distillation baseline: BCE(main, y) + A * BCE(main, sigmoid(t)), no auxiliary head.
``aux_weight=0`` is the student without the teacher. Examples without a teacher score only
contribute the label loss.

Only the torchrec model (the main head) is saved: the package format is unchanged.
"""

from __future__ import annotations

import time
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


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    aux_weight: float = 1.0  # A: weight of the teacher's loss (0 = no teacher)
    adapter: Adapter = "mlp"
    distill_head: Literal["aux", "main"] = "aux"

    def __post_init__(self) -> None:
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight: must be >= 0, got {self.aux_weight}")
        if self.adapter not in ("mlp", "affine", "none"):
            raise ValueError(f"adapter: one of mlp, affine, none, got {self.adapter!r}")
        if self.distill_head not in ("aux", "main"):
            raise ValueError(f"distill_head: aux or main, got {self.distill_head!r}")


class StudentAdapter(torch.nn.Module):
    """Maps (teacher logit, snapshot age in days) to an adapted logit; starts as the identity."""

    def __init__(self, kind: Adapter, hidden: int = 16):
        super().__init__()
        self.kind = kind
        if kind == "affine":
            self.w = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # a, b, c, d
        elif kind == "mlp":
            self.mlp = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
            torch.nn.init.zeros_(self.mlp[2].weight)
            torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """t, age float32 [B] -> adapted logit [B]."""
        if self.kind == "affine":
            a, b, c, d = self.w
            return (a + b * age) * t + c + d * age
        if self.kind == "mlp":
            return t + self.mlp(torch.stack((t, age), dim=1)).squeeze(1)
        return t


class Student(torch.nn.Module):
    """A torchrec DLRM / DLRM_DCN with an auxiliary head on its top MLP's last hidden layer."""

    def __init__(self, workload: WorkloadConfig, adapter: Adapter = "none"):
        super().__init__()
        self.model = build_model(workload)
        hidden = workload.top_mlp[-2] if len(workload.top_mlp) > 1 else None
        if hidden is None:
            raise ValueError(f"{workload.name}: top_mlp needs a hidden layer for the auxiliary head")
        self.aux_head = torch.nn.Linear(hidden, 1)
        self.adapter = StudentAdapter(adapter)

    def forward(self, dense: torch.Tensor, sparse) -> tuple[torch.Tensor, torch.Tensor]:
        """(main logit [B], aux logit [B])."""
        m = self.model
        x = m.inter_arch(dense_features=m.dense_arch(dense), sparse_features=m.sparse_arch(sparse))
        h = m.over_arch.model[0](x)  # [B, H]
        return m.over_arch.model[1](h).squeeze(1), self.aux_head(h).squeeze(1)


def distill_loss(
    main: torch.Tensor,  # [B] main-head logits
    aux: torch.Tensor,  # [B] aux-head logits
    y: torch.Tensor,  # [B] labels
    teacher: torch.Tensor,  # [B] teacher logits (any value where has_teacher is False)
    age: torch.Tensor,  # [B] teacher snapshot age, days
    has_teacher: torch.Tensor,  # bool [B]
    adapter: StudentAdapter,
    config: DistillConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's loss (see the module docstring) and its parts."""
    label = F.binary_cross_entropy_with_logits(main, y)
    parts = {"label": float(label.detach())}
    total = label
    mask = has_teacher.float()
    n = mask.sum().clamp(min=1.0)
    if config.aux_weight > 0 and bool(has_teacher.any()):
        if config.distill_head == "main":
            soft = torch.sigmoid(teacher)
            d = (F.binary_cross_entropy_with_logits(main, soft, reduction="none") * mask).sum() / n
        else:
            adapted = adapter(teacher, age)
            target = torch.sigmoid(adapted).detach()  # the aux head follows the adapter, not the reverse
            d = (F.binary_cross_entropy_with_logits(aux, target, reduction="none") * mask).sum() / n
            if adapter.kind != "none":
                fit = (F.binary_cross_entropy_with_logits(adapted, y, reduction="none") * mask).sum() / n
                total = total + fit
                parts["adapter"] = float(fit.detach())
        total = total + config.aux_weight * d
        parts["distill"] = float(d.detach())
    return total, parts


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
    path: Path
    last_loss: dict[str, float]


def train_student(
    workload: WorkloadConfig,
    data: TrainingSet,
    out: Path,
    config: DistillConfig,
    *,
    epochs: int = 1,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> DistillResult:
    torch.manual_seed(seed)
    student = Student(workload, config.adapter)
    opts = optimizers(student, student.model.sparse_arch)
    n = data.labels.shape[0]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    steps, parts = 0, {}
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    bar = tqdm(range(0, len(order), batch_size), desc=f"train {workload.name} (distill)", disable=not progress,
               unit="step")
    for start in bar:
        idx = order[start:start + batch_size]
        b = _take(data.batch, idx)
        main, aux = student(torch.from_numpy(b.dense), to_kjt(b, workload.features))
        loss, parts = distill_loss(main, aux, torch.from_numpy(data.labels[idx]),
                                   torch.from_numpy(data.teacher[idx]), torch.from_numpy(data.age_days[idx]),
                                   torch.from_numpy(data.has_teacher[idx]), student.adapter, config)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        steps += 1
        bar.set_postfix(loss=f"{float(loss):.4f}")
    for bag in student.model.sparse_arch.embedding_bag_collection.embedding_bags.values():
        bag.sparse = False
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(student.model.state_dict(), out)  # the main head only: the package's usual tensors
    return DistillResult(examples=n, with_teacher=int(data.has_teacher.sum()), steps=steps,
                         seconds=time.perf_counter() - t0, path=out, last_loss=parts)


def _take(batch: Batch, idx: np.ndarray) -> Batch:
    """Examples ``idx`` of a batch, in that order (a jagged gather)."""
    from recserve.batch import Bags

    sparse = {}
    for f, bags in batch.sparse.items():
        offsets = np.cumsum(bags.lengths, dtype=np.int64) - bags.lengths  # [B] start of each bag
        lengths = bags.lengths[idx]  # [b]
        new_start = np.cumsum(lengths, dtype=np.int64) - lengths
        pos = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(offsets[idx] - new_start, lengths)  # [n]
        sparse[f] = Bags(bags.values[pos], lengths, None if bags.weights is None else bags.weights[pos])
    return Batch(batch.dense[idx], sparse, None if batch.unit_ids is None else batch.unit_ids[idx])


def draw_labels(logs: str, out: str, workload: WorkloadConfig, *, world_seed: int = 0, drift: float = 0.0,
                day_zero: float = 0.0, seed: int = 0) -> int:
    """Clicks for every logged example from the synthetic world's ground truth at the day it
    was served (``(logged_at - day_zero) / 86400``); writes the log rows plus ``label`` and
    ``example_key`` to ``out``, one file per log file. Returns the examples labelled."""
    from recserve.synth import ClickModel

    fs, files = parquet_files(logs)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {logs}")
    ofs, odir = open_dir(out)
    ofs.create_dir(odir, recursive=True)
    rng = np.random.default_rng(seed)
    world = ClickModel(workload, seed=world_seed, drift=drift)
    total = 0
    for f in files:
        t = pq.read_table(f, filesystem=fs)
        batch = table_batch(t, workload.features)
        days = (pc.cast(t["logged_at"], pa.int64()).to_numpy() / 1e6 - day_zero) / DAY_S
        labels = np.empty(t.num_rows, np.float32)
        for d in np.unique(np.floor(days)):  # one ground truth per day
            rows = np.flatnonzero(np.floor(days) == d)
            labels[rows] = world.at(float(d)).labels(_take(batch, rows), rng)
        keys = example_keys(table_batch(t))
        t = t.append_column(LABEL, pa.array(labels)).append_column(KEY, pa.array(keys, pa.string()))
        write_atomic(ofs, odir, "labels-" + f.rsplit("/", 1)[-1], t)
        total += t.num_rows
    return total
