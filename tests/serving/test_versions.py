"""Model versions (serving/app/versions.py, version_store.py, rollout.py) on a real Ray Serve
stack: a new version goes live under load with no failed request and no request scored by a mix of versions; a request may
pin either version while both are up; a corrupt package is refused (by the command, and by
the replicas if it gets that far) while the running version keeps answering."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from recserve.synth import TrafficGenerator
from serving.app.rollout import VersionRefused
from serving.app.versions import VersionTable

TOL = 1e-5


def test_the_version_table_switches_whole_and_never_drops_the_live_version():
    table = VersionTable(live="v1", packages={"v1": "/p1"}, apps={"v1": "recserve@v1"})
    table = table.with_version("v2", "/p2", "recserve@v2")
    assert table.live == "v1" and set(table.packages) == {"v1", "v2"}
    table = table.with_live("v2")
    with pytest.raises(ValueError, match="live"):
        table.without("v2")
    table = table.without("v1")
    assert VersionTable.from_json(table.to_json()) == table and table.serial == 3
    with pytest.raises(ValueError, match="not among"):
        VersionTable(live="v3", packages={"v1": "/p1"}, apps={"v1": "a"})


@pytest.fixture(scope="module")
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


class Load:
    """Two client threads sending requests back to back; records (version, correct?) or the error."""

    def __init__(self, client, references, tiny, helpers, *, pin: str = ""):
        self.client, self.references, self.helpers, self.pin = client, references, helpers, pin
        self.gen = TrafficGenerator(tiny, seed=41)
        self.batches = [self.gen.batch(8) for _ in range(16)]
        self.results: list[tuple[str, bool]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(2)]

    def run(self, worker: int) -> None:
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
            self.results.append((resp.version, ref is not None and np.allclose(got, ref(batch), atol=TOL)))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture(scope="module")
def stack(serve_instance, two_versions):
    """A router app ("swap") serving v1 from its own version app."""
    from ray import serve

    from serving.api.client import RankingClient
    from serving.config import AppArgs
    from serving.app.rollout import start_stack

    package, _ = two_versions["v1"]
    start_stack(AppArgs(package=str(package), default_timeout_s=30, wire_dtype="float32"), router_app="swap", route_prefix="/swap")
    client = RankingClient(f"127.0.0.1:{serve_instance}", application="swap")
    client.wait_until_serving("tiny", "v1")
    yield client
    client.close()
    import ray

    if not ray.is_initialized():  # the session's Ray stopped after its last test (tests/conftest.py runs
        return  # this module's Ray-free test after it): nothing left to delete
    from serving.app.version_store import clear_table, load_table

    table = load_table("swap")
    serve.delete("swap")
    for app in set(table.apps.values()) if table else ():
        serve.delete(app)
    clear_table("swap")


def test_a_new_version_goes_live_under_load_with_no_failed_request_and_no_mixed_version(stack, two_versions, tiny,
                                                                                       helpers):
    from serving.app.rollout import DeployTimings, deploy

    references = {v: ref for v, (_, ref) in two_versions.items()}
    pinned: dict[str, list[str]] = {}

    def check_pinning(version, default_warm_up):  # while both are up, either may be pinned
        default_warm_up(version)
        batch = TrafficGenerator(tiny, seed=5).batch(3)
        for v in ("v1", "v2"):
            got = stack.predict(batch.dense, helpers.as_sparse(batch), version=v, timeout=30)
            np.testing.assert_allclose(got, references[v](batch), atol=TOL)
            pinned.setdefault(v, []).append("ok")
        # a burst pinned to both versions at once: the router coalesces concurrent requests,
        # never two versions into one batch (a mixed batch would score with one version's weights)
        from concurrent.futures import ThreadPoolExecutor

        gen = TrafficGenerator(tiny, seed=7)
        burst = [(("v1", "v2")[i % 2], gen.batch(1 + i % 5)) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda vb: stack.predict(vb[1].dense, helpers.as_sparse(vb[1]), version=vb[0],
                                                         timeout=30), burst))
        for (v, b), scores in zip(burst, got):
            np.testing.assert_allclose(scores, references[v](b), atol=TOL, err_msg=f"pinned to {v}")

    with Load(stack, references, tiny, helpers) as load:
        time.sleep(2)
        table = deploy(two_versions["v2"][0], router_app="swap", timings=DeployTimings(drain_s=10),
                       wrap_warm_up=check_pinning, progress=lambda _: None)
        time.sleep(2)
    assert table.live == "v2" and set(table.packages) == {"v2"}
    assert load.errors == [], load.errors[:5]
    versions = [v for v, _ in load.results]
    assert all(ok for _, ok in load.results), "every score matches the reference of the version that answered"
    assert "v1" in versions and "v2" in versions, "load ran across the switch"
    assert versions.index("v2") > 0 and "v1" not in versions[-10:], "after the switch only v2 answers"
    assert pinned == {"v1": ["ok"], "v2": ["ok"]}
    with pytest.raises(grpc.RpcError) as err:  # v1 is gone: pinning it is NOT_FOUND
        batch = TrafficGenerator(tiny, seed=6).batch(2)
        stack.predict(batch.dense, helpers.as_sparse(batch), version="v1", timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_corrupt_package_is_refused_and_the_running_version_keeps_answering(stack, two_versions, tiny, helpers,
                                                                              tmp_path):
    from serving.app.rollout import DeployTimings, deploy, run_version_app
    from serving.app.version_store import load_table
    from serving.app.versions import version_app_name

    live = load_table("swap").live
    references = {v: ref for v, (_, ref) in two_versions.items()}
    bad = shutil.copytree(two_versions["v1"][0], tmp_path / "v3")
    manifest = (bad / "manifest.json").read_text().replace('"version": "v1"', '"version": "v3"')
    (bad / "manifest.json").write_text(manifest)
    with open(bad / "shards" / "shard-1.safetensors", "ab") as f:
        f.write(b"corrupt")
    with Load(stack, references, tiny, helpers) as load:
        with pytest.raises(VersionRefused, match="shard-1.safetensors"):  # the command's own check
            deploy(bad, router_app="swap", progress=lambda _: None)
        # past the command (as if the file broke after the check): the replicas refuse it
        from serving.app.builder import build_version_app
        from serving.config import AppArgs

        app = version_app_name("swap", "v3")
        with pytest.raises(VersionRefused, match="shard-1"):
            run_version_app(build_version_app(AppArgs(package=str(bad))), app, DeployTimings(ready_timeout_s=120))
        time.sleep(1)
    assert load.errors == [], load.errors[:5]
    assert load.results and all(ok and v == live for v, ok in load.results)
    assert load_table("swap").live == live and set(load_table("swap").packages) == {live}
