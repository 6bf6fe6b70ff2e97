"""The switch from one model version to the next, run from a driver connected to the stack's Ray.

:func:`deploy_version` (``recserve deploy PACKAGE``):

    1. check the package (schema + every sha256): refused here, before anything changes
    2. run its version app beside the running one (``route_prefix=None``: not a proxy
       endpoint) and wait until every replica is RUNNING; if a replica refuses the package,
       the app is deleted and the error names the deployment and Serve's message
    3. add it to the table (not live): the routers accept requests pinned to it
    4. warm up: requests pinned to it through a router; all must score
    5. make it live (broadcast; every router replica acknowledges)
    6. drain the old version (no request in flight on it at any router, or drain_s), then
       drop it from the table and delete its app
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.app.version_store import load_args, load_table, store_args, store_table
from serving.app.versions import ROUTER_APP, VersionTable, version_app_name


class VersionRefused(Exception):
    """A package the stack will not switch to; the message names the file (or deployment) and the problem.
    The running version was not touched."""


@dataclass(frozen=True, kw_only=True)
class DeployTimings:
    ready_timeout_s: float = 300.0  # for the new version's replicas to be RUNNING
    warm_up_requests: int = 8  # pinned requests through the router before the switch
    drain_s: float = 30.0  # longest wait for the old version's requests in flight to finish


def check_package(path: str | Path):
    """The package's manifest after every check serving would run; VersionRefused names the file."""
    from recserve.package import ModelPackage, PackageError

    try:
        package = ModelPackage.open(path)
        package.verify()
    except PackageError as e:
        raise VersionRefused(f"{path}: {e}") from None
    except FileNotFoundError as e:
        raise VersionRefused(f"{path}: {e}") from None
    return package.manifest


def _app_failure(app: str) -> str | None:
    """Serve's reason why a version app cannot start (None while it may still): a deployment
    whose replicas keep failing to start (their constructor refused the package), or an app
    that failed to deploy. The reason is the error's own line (a PackageError names the file)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    status = serve.status().applications.get(app)
    if status is None:
        return None
    failed = []
    for name, d in status.deployments.items():
        message = d.message or ""
        if "failed to start" in message or str(d.status).endswith("DEPLOY_FAILED"):
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            errors = [line for line in lines if "Error" in line and ":" in line]
            failed.append(f"{name}: {(errors or lines or [str(d.status)])[-1][:500]}")
    if failed:
        return "; ".join(failed)
    if status.status == ApplicationStatus.DEPLOY_FAILED:
        return status.message[:500] or "deploy failed"
    return None


def serve_run(application, name: str, *, route_prefix: str | None, wait: bool = True) -> None:
    """``serve.run`` as every application of a stack is run: open to ``recserve scale``
    (external_scaler_enabled: one deployment's replica count set through the dashboard's REST
    API, the others left as they are) and without the access log (one line per request).

    ``wait=False`` only hands the application to Serve's controller and returns: the caller
    watches ``serve.status()`` itself, and no thread is left waiting on Serve (one that outlived
    its Ray would start a fresh local Ray in this process by Ray's auto-init)."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    target = serve.RunTarget(target=application, name=name, route_prefix=route_prefix, external_scaler_enabled=True,
                             logging_config=LoggingConfig(enable_access_log=False))
    serve.run_many([target], wait_for_ingress_deployment_creation=wait, wait_for_applications_running=wait)


def wait_running(app: str, timeout_s: float, *, on_poll: Callable[[], None] | None = None) -> str | None:
    """Wait, in the calling thread, until Serve reports ``app`` RUNNING: None, or why it will
    not be (its failure, or the timeout). ``on_poll()`` runs every half second meanwhile
    (progress). A caller that stops (Ctrl-C) leaves nothing behind that still waits on Serve."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        failure = _app_failure(app)
        if failure:
            return failure
        status = serve.status().applications.get(app)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return None
        if time.monotonic() >= deadline:
            return f"not RUNNING after {timeout_s:.0f}s"
        if on_poll is not None:
            on_poll()
        time.sleep(0.5)


def run_version_app(application, app: str, timings: DeployTimings, *,
                    on_poll: Callable[[], None] | None = None) -> None:
    """Run ``application`` as ``app`` (not an HTTP/gRPC endpoint) and wait until it is RUNNING.

    A version whose replicas refuse their package is deleted again and VersionRefused
    carries Serve's message (the PackageError naming the file)."""
    from ray import serve

    serve_run(application, app, route_prefix=None, wait=False)
    failure = wait_running(app, timings.ready_timeout_s, on_poll=on_poll)
    if failure:
        serve.delete(app, _blocking=False)
        raise VersionRefused(f"version app {app} did not start: {failure}")


def deploy_version(
    package: str | Path,
    *,
    build_version_app: Callable[[str], object],
    router_app: str = ROUTER_APP,
    warm_up: Callable[[str], None],
    broadcast: Callable[[VersionTable], None],
    drained: Callable[[str], bool],
    timings: DeployTimings = DeployTimings(),
    progress: Callable[[str], None] = print,
) -> VersionTable:
    """Bring ``package`` up beside the live version and switch to it (see the module docstring).

    The hooks connect it to the router without importing it: ``build_version_app(path)``
    is the version's Serve application, ``warm_up(version)`` sends pinned requests through
    the router (raises on any failure), ``broadcast(table)`` hands a table to every router
    replica, ``drained(version)`` says whether no router has a request in flight on it."""
    from ray import serve

    path = str(Path(package).expanduser().resolve())
    progress(f"checking {path} ...")
    manifest = check_package(path)
    table = load_table(router_app)
    if table is None:
        raise VersionRefused(f"no recserve stack is running under the application name {router_app!r}")
    if manifest.version in table.packages:
        raise VersionRefused(f"{path}: version {manifest.version!r} is already up (from {table.packages[manifest.version]}); "
                             "export with a new version")
    old = table.live
    app = version_app_name(router_app, manifest.version)
    progress(f"starting {manifest.name} {manifest.version} as application {app} beside {old} ...")
    run_version_app(build_version_app(path), app, timings)
    table = table.with_version(manifest.version, path, app)
    store_table(table, router_app)
    broadcast(table)
    try:
        progress(f"warming up {manifest.version} ({timings.warm_up_requests} pinned requests) ...")
        warm_up(manifest.version)
    except BaseException as e:
        table = table.without(manifest.version)
        store_table(table, router_app)
        broadcast(table)
        serve.delete(app, _blocking=False)
        raise VersionRefused(f"version {manifest.version} failed its warm-up, still serving {old}: {e}") from e
    table = table.with_live(manifest.version)
    store_table(table, router_app)
    broadcast(table)
    progress(f"live: {manifest.version}; draining {old} ...")
    deadline = time.monotonic() + timings.drain_s
    while not drained(old) and time.monotonic() < deadline:
        time.sleep(0.1)
    old_app = table.apps[old]
    table = table.without(old)
    store_table(table, router_app)
    broadcast(table)
    if old_app != router_app:
        serve.delete(old_app, _blocking=True)
    progress(f"stopped {old} ({old_app})")
    return table


# ---------------------------------------------------------------------- wiring (driver side)


def router_hooks(router_app: str, *, warm_up_requests: int, timeout_s: float = 30.0) -> dict:
    """deploy_version's hooks, talking to the router app's replicas through Serve handles:
    ``set_versions`` and ``in_flight`` broadcast to every replica; warm-up requests are
    pinned Predict calls."""
    from ray import serve

    def router():
        return serve.get_deployment_handle("Router", app_name=router_app)

    def broadcast(table: VersionTable) -> None:
        lives = router().broadcast("set_versions", table.to_json()).results(timeout_s=timeout_s)
        if any(live != table.live for live in lives):
            raise RuntimeError(f"router replicas report live versions {lives}, expected {table.live!r}")

    def drained(version: str) -> bool:
        return sum(router().broadcast("in_flight", version).results(timeout_s=timeout_s)) == 0

    def warm_up(version: str) -> None:
        from recserve.synth import TrafficGenerator
        from serving.api.codec import encode_request

        table = load_table(router_app)
        from recserve.package import ModelPackage

        workload = ModelPackage.open(table.packages[version]).manifest.workload
        gen = TrafficGenerator(workload, seed=7)
        handle = router().options(method_name="Predict")
        for i in range(warm_up_requests):
            batch = gen.batch()
            sparse = {f: (b.values, b.lengths) for f, b in batch.sparse.items()}
            request = encode_request(batch.dense, sparse, version=version, request_id=f"warm-up-{version}-{i}")
            for attempt in range(20):  # a busy router may shed a warm-up request: ask again
                response = handle.remote(request).result(timeout_s=timeout_s)
                if response.version or attempt == 19:
                    break
                time.sleep(0.1 * (attempt + 1))
            if response.version != version or len(response.scores) != batch.batch_size:
                raise RuntimeError(f"warm-up request {i} was not scored by {version} "
                                   f"(answered by {response.version!r} with {len(response.scores)} scores)")

    return {"broadcast": broadcast, "drained": drained, "warm_up": warm_up}


def deploy(
    package: str | Path,
    *,
    router_app: str = ROUTER_APP,
    timings: DeployTimings = DeployTimings(),
    wrap_warm_up: Callable[[str, Callable[[str], None]], None] | None = None,
    progress: Callable[[str], None] = print,
) -> VersionTable:
    """:func:`deploy_version` against the running stack ``router_app`` (from a driver
    connected to its Ray), the new version started with the stack's settings.
    ``wrap_warm_up(version, warm_up)`` may add checks around the warm-up (tests)."""
    from serving.app.builder import build_version_app
    from serving.config import AppArgs

    if load_table(router_app) is None:  # a stack started as one app (deploy/serve.yaml): its router's own table
        from ray import serve

        router = serve.get_deployment_handle("Router", app_name=router_app)
        store_table(VersionTable.from_json(router.version_table.remote().result(timeout_s=30)), router_app)
    stored = load_args(router_app)
    base = AppArgs.model_validate_json(stored) if stored else AppArgs()
    hooks = router_hooks(router_app, warm_up_requests=timings.warm_up_requests)
    if wrap_warm_up is not None:
        warm_up = hooks["warm_up"]
        hooks["warm_up"] = lambda version: wrap_warm_up(version, warm_up)
    return deploy_version(
        package,
        build_version_app=lambda path: build_version_app(base.model_copy(update={"package": path})),
        router_app=router_app,
        timings=timings,
        progress=progress,
        **hooks,
    )


def start_stack(args, *, router_app: str = ROUTER_APP, route_prefix: str = "/",
                timings: DeployTimings = DeployTimings(), on_poll: Callable[[], None] | None = None) -> VersionTable:
    """Start a versioned stack (``recserve serve``): the router application, then
    ``args.package``'s version application; the table and the stack's settings go to Ray's GCS
    first, where the router replicas and a later ``recserve deploy`` find them. The same layout
    as after a swap: the first version's shards and tower are retired by the next deploy.

    The router comes first: with Serve's direct ingress every application's ingress replica
    takes the lowest free port of the range that starts at ``recserve serve --port``
    (serving/ops/ingress.py), and that port must be the Router's, not the version's idle front."""
    from serving.app.builder import build_router_app, build_version_app
    from recserve.default_package import resolve_package

    path = str(resolve_package(args.package))
    args = args.model_copy(update={"package": path})
    manifest = check_package(path)
    app = version_app_name(router_app, manifest.version)
    table = VersionTable(live=manifest.version, packages={manifest.version: path}, apps={manifest.version: app})
    store_table(table, router_app)
    store_args(args.model_dump_json(), router_app)
    serve_run(build_router_app(args), router_app, route_prefix=route_prefix, wait=False)
    failure = wait_running(router_app, timings.ready_timeout_s, on_poll=on_poll)
    if failure:
        raise VersionRefused(f"router app {router_app} did not start: {failure}")
    run_version_app(build_version_app(args), app, timings, on_poll=on_poll)
    return table
