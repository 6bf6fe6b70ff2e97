"""Model versions (serving/app/versions.py, version_store.py, rollout.py) on a real Ray Serve
stack: a new version goes live under load with no failed request and no request scored by a mix of versions; a request may
pin either version while both are up; a corrupt package is refused (by the command, and by
the replicas if it gets that far) while the running version keeps answering."""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import pytest

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

    with helpers.Load(stack, references, tiny, helpers, atol=TOL) as load:
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
    with helpers.Load(stack, references, tiny, helpers, atol=TOL) as load:
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

