"""Train a workload's torchrec model on synthetic clicks from a hidden ground truth.

Embedding tables get sparse gradients and row-wise Adagrad, so a step costs the rows it
touches, not the table size: full Criteo cardinalities train on a laptop-class CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recserve.model import build_model, predict, to_kjt
from recserve.synth import ClickModel, TrafficGenerator
from recserve.workloads import WorkloadConfig


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    auc: float  # held-out AUC of the trained model
    oracle_auc: float  # held-out AUC of the hidden ground truth (the ceiling)
    steps: int
    seconds: float
    path: Path


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties averaged)."""
    labels = labels.astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Log loss of ``probs`` divided by the entropy of the base rate (lower is better; 1 = no skill)."""
    y = labels.astype(np.float64)
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    rate = y.mean()
    if rate <= 0 or rate >= 1:
        return float("nan")
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    return float(ll / -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)))


def optimizers(model: torch.nn.Module, sparse_module: torch.nn.Module) -> tuple[torch.optim.Optimizer, ...]:
    """(row-wise Adagrad for the embedding tables, with sparse gradients; Adam for every other parameter)."""
    for bag in sparse_module.embedding_bag_collection.embedding_bags.values():
        bag.sparse = True  # sparse gradients: cost per step ~ rows touched
    emb = list(sparse_module.parameters())
    ids = {id(p) for p in emb}
    return (torch.optim.Adagrad(emb, lr=0.05),
            torch.optim.Adam([p for p in model.parameters() if id(p) not in ids], lr=3e-3))


def train(
    workload: WorkloadConfig,
    out: Path,
    *,
    steps: int = 300,
    batch_size: int = 256,
    seed: int = 0,
    eval_examples: int = 8192,
    progress: bool = True,
) -> TrainResult:
    torch.manual_seed(seed)
    model = build_model(workload)
    opt_sparse, opt_dense = optimizers(model, model.sparse_arch)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    truth = ClickModel(workload, seed=seed)
    gen = TrafficGenerator(workload, seed=seed)
    label_rng = np.random.default_rng(seed + 7)
    features = workload.features
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {workload.name}", disable=not progress, unit="step")
    for _ in bar:
        batch = gen.batch(batch_size)
        y = torch.from_numpy(truth.labels(batch, label_rng))
        logits = model(dense_features=torch.from_numpy(batch.dense), sparse_features=to_kjt(batch, features))
        loss = loss_fn(logits.squeeze(1), y)
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        loss.backward()
        opt_sparse.step()
        opt_dense.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.perf_counter() - t0

    model.eval()
    held_out = TrafficGenerator(workload, seed=seed + 10_000).batch(eval_examples)
    y_eval = truth.labels(held_out, np.random.default_rng(seed + 10_001))
    model_auc = auc(y_eval, predict(model, held_out, features))
    oracle = auc(y_eval, truth.logits(held_out))

    out.parent.mkdir(parents=True, exist_ok=True)
    for bag in model.sparse_arch.embedding_bag_collection.embedding_bags.values():
        bag.sparse = False
    torch.save(model.state_dict(), out)
    return TrainResult(auc=model_auc, oracle_auc=oracle, steps=steps, seconds=seconds, path=out)
