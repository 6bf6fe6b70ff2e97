"""Serving fixtures: the torchrec reference of the tiny model (its packages come from the root
conftest's tiny_packages), test requests, and ONE Ray instance + Serve for the whole session
(start-ups are the slow part on CI's 2 cores)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recserve.batch import Bags, Batch
from recserve.workloads import WorkloadConfig
from serving.ops.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def as_sparse(batch: Batch) -> dict:
    """A Batch's sparse features in the client's format."""
    return {f: (b.values, b.lengths) if b.weights is None else (b.values, b.lengths, b.weights)
            for f, b in batch.sparse.items()}


def with_weights(batch: Batch, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    sparse = {f: Bags(b.values, b.lengths, rng.uniform(0.1, 2.0, b.values.size).astype(np.float32))
              for f, b in batch.sparse.items()}
    return Batch(batch.dense, sparse, batch.unit_ids)


MAX_BATCH = 64  # max_batch_size of the servers under test


def bad_requests(tiny: WorkloadConfig) -> list[tuple[str, object, str, str]]:
    """(case, PredictRequest, expected gRPC code name, text the message must contain): issue 3 §5."""
    import math

    from recserve.synth import TrafficGenerator
    from serving.api.codec import encode_request

    good = TrafficGenerator(tiny, seed=11).batch(4)

    def req(**kw):
        r = encode_request(good.dense, as_sparse(good), unit_ids=good.unit_ids)
        for k, v in kw.items():
            setattr(r, k, v)
        return r

    cases = []

    def add(case, r, code, text):
        cases.append((case, r, code, text))

    r = req(); r.sparse["no_such_feature"].lengths.extend([0, 0, 0, 0])
    add("unknown feature", r, "INVALID_ARGUMENT", "sparse['no_such_feature']")
    long_name = "f" * 100_000  # quoted in the message only up to 64 characters
    r = req(); r.sparse[long_name].lengths.extend([0, 0, 0, 0])
    add("unknown feature with a 100 KB name", r, "INVALID_ARGUMENT", "sparse['" + "f" * 64 + "'...")
    r = req(); r.sparse["user_id"].lengths[0] += 1
    add("lengths do not sum to the values", r, "INVALID_ARGUMENT", "sparse['user_id'].lengths")
    r = req(); l = r.sparse["recent_items"].lengths; l[0], l[1] = l[0] + 1, -1; r.sparse["recent_items"].lengths[:] = l
    add("negative length", r, "INVALID_ARGUMENT", "sparse['recent_items'].lengths")
    r = req(); r.sparse["item_id"].lengths.append(1); r.sparse["item_id"].values.append(3)
    add("lengths not one per example", r, "INVALID_ARGUMENT", "sparse['item_id'].lengths")
    r = req(); r.sparse["item_id"].values[0] = 5000
    add("id equal to rows", r, "INVALID_ARGUMENT", "sparse['item_id'].values")
    r = req(); r.sparse["category"].values[0] = -1
    add("negative id", r, "INVALID_ARGUMENT", "sparse['category'].values")
    r = req(); r.sparse["user_id"].weights.extend([1.0])
    add("weights not one per id", r, "INVALID_ARGUMENT", "sparse['user_id'].weights")
    r = req(); del r.dense[-1]
    add("wrong dense width", r, "INVALID_ARGUMENT", "dense")
    r = req(); r.dense[5] = math.nan
    add("NaN in dense", r, "INVALID_ARGUMENT", "dense")
    r = req(); r.dense[0] = math.inf
    add("inf in dense", r, "INVALID_ARGUMENT", "dense")
    r = req(); r.dense[3] = 1e30
    add("finite dense far above the bound", r, "INVALID_ARGUMENT", "feature 3")
    r = req(); r.dense[1] = -3e38
    add("dense near the float32 maximum", r, "INVALID_ARGUMENT", "outside [-1e+06, 1e+06]")
    r = req(); r.sparse["recent_items"].weights.extend([2e6] * len(r.sparse["recent_items"].values))
    add("weights above the bound", r, "INVALID_ARGUMENT", "sparse['recent_items'].weights")
    r = encode_request(np.zeros((0, tiny.dense_features), np.float32), {f: ([], []) for f in tiny.features})
    add("empty batch", r, "INVALID_ARGUMENT", "batch_size")
    r = req(); r.unit_ids.append(7)
    add("mismatched unit ids", r, "INVALID_ARGUMENT", "unit_ids")
    big = TrafficGenerator(tiny, seed=12).batch(MAX_BATCH + 1)
    add("batch above the maximum", encode_request(big.dense, as_sparse(big)), "INVALID_ARGUMENT", "batch_size")
    add("unknown model", req(model="no-such-model"), "NOT_FOUND", "no-such-model")
    add("unknown version", req(version="v999"), "NOT_FOUND", "v999")
    add("unknown model with a 100 KB name", req(model="m" * 100_000), "NOT_FOUND", "m" * 64 + "'...")
    return cases


class VersionedLoad:
    """Two client threads sending requests back to back; records (version, correct?) -- each
    answer against the reference of the version that answered -- or the error."""

    def __init__(self, client, references, tiny, helpers, *, atol: float, pin: str = ""):
        from recserve.synth import TrafficGenerator

        self.client, self.references, self.helpers, self.pin, self.atol = client, references, helpers, pin, atol
        self.gen = TrafficGenerator(tiny, seed=41)
        self.batches = [self.gen.batch(8) for _ in range(16)]
        self.results: list[tuple[str, bool]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(2)]

    def run(self, worker: int) -> None:
        import grpc

        from serving.api.codec import encode_request

        i = worker
        while not self.stop.is_set():
            batch = self.batches[i % len(self.batches)]
            i += 2
            try:
                resp = self.client.predict_raw(encode_request(batch.dense, self.helpers.as_sparse(batch),
                                                              version=self.pin), timeout=30)
            except grpc.RpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")
                continue
            got = np.asarray(resp.scores, np.float32)
            ref = self.references.get(resp.version)
            self.results.append((resp.version, ref is not None and np.allclose(got, ref(batch), atol=self.atol)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture(scope="session")
def helpers():
    """Test data and helpers for the serving tests (importlib import mode: tests cannot import conftest)."""
    return SimpleNamespace(max_batch=MAX_BATCH, as_sparse=as_sparse, with_weights=with_weights,
                           bad_requests=bad_requests, Load=VersionedLoad)


@pytest.fixture(scope="session")
def reference(tiny: WorkloadConfig, tiny_state_dict: Path):
    """reference(batch) -> sigmoid of the torchrec forward (weighted model if the batch has weights)."""
    from recserve.model import build_model, predict

    state = torch.load(tiny_state_dict, weights_only=True)
    models = {}
    for weighted in (False, True):
        m = build_model(tiny, weighted=weighted)
        m.load_state_dict(state)
        models[weighted] = m.eval()

    def score(batch: Batch) -> np.ndarray:
        weighted = any(b.weights is not None for b in batch.sparse.values())
        return predict(models[weighted], batch, tiny.features)

    return score


_SERVE_STOPPED = []  # set once the session's Ray is stopped: it is never started again


def _stop_serve() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    _SERVE_STOPPED.append(True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "serve_instance" in item.fixturenames and _SERVE_STOPPED:
        pytest.fail("the session's Ray + Serve was already stopped after an earlier block of tests that use it: "
                    "tests/conftest.py must run every such test in one block", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """Stop the session's Ray once its last test is done (the root conftest runs every test
    that uses it in one block), so it does not idle beside the tests that follow; after the
    test's own fixtures are torn down (they delete their Serve applications)."""
    result = yield
    if "serve_instance" in item.fixturenames and (nextitem is None or "serve_instance" not in nextitem.fixturenames):
        _stop_serve()
    return result


@pytest.fixture(scope="session")
def serve_instance():
    """One local Ray + Serve with the gRPC proxy on a free port; yields that port. Stopped
    after the last test that uses it (pytest_runtest_teardown), else at the session's end."""
    import ray
    from ray import serve

    from recserve.cli.serve import SERVE_ENV
    from serving.api.wire import GRPC_SERVICERS

    # replicas import serving/, kernels/, recserve/ from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for name, value in SERVE_ENV.items():  # as recserve serve runs Serve
        os.environ.setdefault(name, value)
    port = free_port()
    for attempt in range(3):
        try:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                     log_to_driver=False, configure_logging=False)
            break
        except Exception as e:  # Ray gives its raylet a fixed 30 s to register: too short on a swamped machine
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS},
    )
    yield port
    _stop_serve()


@pytest.fixture(scope="session")
def deploy(serve_instance):
    """deploy(package, name, **args) -> RankingClient for that Serve application."""
    from ray import serve

    from recserve.package import ModelPackage
    from serving.app.builder import build_app
    from serving.api.client import RankingClient
    from serving.config import AppArgs

    clients = []

    def run(package: Path, name: str, **args) -> RankingClient:
        serve.run(build_app(AppArgs(package=str(package), **args)), name=name, route_prefix=f"/{name}")
        client = RankingClient(f"127.0.0.1:{serve_instance}", application=name)
        clients.append(client)
        m = ModelPackage.open(package).manifest
        client.wait_until_serving(m.name, m.version)  # the proxy learns of new apps asynchronously
        return client

    yield run
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def two_versions(tmp_path_factory, tiny, tiny_state_dict):
    """Packages v1 and v2 of the tiny model with different weights (tables x1.5, a shifted
    logit), each with its torchrec reference: a request scored by v1's shards and v2's tower
    (or the reverse) would match neither."""
    from recserve.export import export_package
    from recserve.model import build_model, predict
    from recserve.planning import plan_workload

    root = tmp_path_factory.mktemp("versions")
    state = torch.load(tiny_state_dict, weights_only=True)
    changed = {k: (v * 1.5 if "embedding_bags" in k else v) for k, v in state.items()}
    changed["over_arch.model.1.bias"] = state["over_arch.model.1.bias"] + 0.3
    torch.save(changed, root / "v2.pt")
    out = {}
    for version, path, sd in (("v1", tiny_state_dict, state), ("v2", root / "v2.pt", changed)):
        plan = plan_workload(tiny, strategy="load", num_shards=2, shard_memory=180_000)
        package = export_package(tiny, path, root / version, plan=plan, version=version, progress=False).path
        model = build_model(tiny)
        model.load_state_dict(sd)
        model.eval()
        out[version] = (package, lambda batch, m=model: predict(m, batch, tiny.features))
    return out
