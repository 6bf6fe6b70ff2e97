import numpy as np
import pytest
import torch

from recserve.model import build_model, predict
from recserve.synth import TrafficGenerator, zipf_ids
from recserve.train import auc, train


def test_training_on_tiny_learns_the_hidden_clicks(tmp_path, tiny):
    result = train(tiny, tmp_path / "m.pt", steps=300, seed=3, progress=False)
    assert result.auc > 0.7, result
    model = build_model(tiny)
    model.load_state_dict(torch.load(result.path, weights_only=True))
    scores = predict(model, TrafficGenerator(tiny, seed=1).batch(32), tiny.features)
    assert scores.shape == (32,) and np.all((scores > 0) & (scores < 1))


def test_auc_matches_its_definition():
    labels = np.array([0, 0, 1, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.4])
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert auc(labels, scores) == pytest.approx(expected)


def test_zipf_ids_stay_in_range_and_favour_a_few_hot_ids():
    ids = zipf_ids(np.random.default_rng(0), 1000, 50_000, 1.05)
    assert ids.min() >= 0 and ids.max() < 1000
    counts = np.sort(np.bincount(ids, minlength=1000))[::-1]
    assert counts[:10].sum() > 0.25 * len(ids)


def test_the_same_seed_gives_the_same_trace(tiny):
    a, b = TrafficGenerator(tiny, seed=5).trace(3), TrafficGenerator(tiny, seed=5).trace(3)
    for x, y in zip(a, b):
        assert np.array_equal(x.dense, y.dense)
        assert all(np.array_equal(x.sparse[f].values, y.sparse[f].values) for f in tiny.features)
