"""Model versions side by side: the version table, and a router replica's view of it.

A running stack is one router application plus one application per model version::

    "recserve"            Router (gRPC ingress; holds no tables)
    "recserve@<version>"  DenseTower (the ingress) + shard-0..N of one package

The :class:`VersionTable` (plain data) says which versions are up, where their package
is, and which one is live. It lives in Ray's GCS key-value store under the router app's
name, so a router replica that starts later reads the same table, and every change is
broadcast to the running router replicas, which swap their per-version handles in one
assignment: a request is routed to exactly one version from decode to scores (shards and
tower of the same app), never a mix. A request may pin any version that is up
(``PredictRequest.version``); an empty version means the live one.

Its storage in Ray's GCS is serving/app/version_store.py; the driver-side switch from one
version to the next, serving/app/rollout.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

ROUTER_APP = "recserve"


def version_app_name(router_app: str, version: str) -> str:
    return f"{router_app}@{version}"


def is_stack_app(app: str, router_app: str = ROUTER_APP) -> bool:
    """Whether ``app`` is the router application of the stack or one of its version applications."""
    return app == router_app or app.startswith(f"{router_app}@")


@dataclass(frozen=True)
class VersionTable:
    """Versions that are up ({version: package dir}) and the live one."""

    live: str
    packages: dict[str, str] = field(default_factory=dict)  # version -> package directory
    apps: dict[str, str] = field(default_factory=dict)  # version -> Serve application holding its shards + tower
    serial: int = 0  # bumped on every change: a router keeps the newest table it has seen

    def __post_init__(self) -> None:
        if self.live not in self.packages:
            raise ValueError(f"live version {self.live!r} is not among the versions up ({sorted(self.packages)})")
        if set(self.apps) != set(self.packages):
            raise ValueError("every version needs both a package and an application")

    def with_version(self, version: str, package: str, app: str) -> VersionTable:
        return replace(self, packages={**self.packages, version: package}, apps={**self.apps, version: app},
                       serial=self.serial + 1)

    def with_live(self, version: str) -> VersionTable:
        return replace(self, live=version, serial=self.serial + 1)

    def without(self, version: str) -> VersionTable:
        if version == self.live:
            raise ValueError(f"cannot drop the live version {version!r}")
        return replace(self, packages={v: p for v, p in self.packages.items() if v != version},
                       apps={v: a for v, a in self.apps.items() if v != version}, serial=self.serial + 1)

    def to_json(self) -> str:
        return json.dumps({"live": self.live, "packages": self.packages, "apps": self.apps, "serial": self.serial},
                          sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> VersionTable:
        raw = json.loads(text)
        return VersionTable(live=raw["live"], packages=dict(raw["packages"]), apps=dict(raw["apps"]),
                            serial=int(raw["serial"]))


@dataclass(frozen=True)
class ServedVersion:
    """What a router replica needs to route requests to one version (built by the router)."""

    version: str
    app: str  # the Serve application holding its shards and tower
    manifest: object  # recserve.package.Manifest
    parts: object  # the router's per-version state: spec, routing, handles (opaque here)


class RouterVersions:
    """A router replica's view of the versions that are up: immutable snapshots swapped in
    one assignment, so a request that picked its version keeps it to the end; counts of
    requests in flight per version (for the drain).

    ``build(version, package_dir, app) -> ServedVersion`` makes one version's state (it
    opens the manifest and gets the deployment handles); versions already built are reused.
    """

    def __init__(self, build: Callable[[str, str, str], ServedVersion], table: VersionTable):
        self._build = build
        self.table = table
        self.served: dict[str, ServedVersion] = {}
        self.in_flight: dict[str, int] = {}
        self.apply(table)

    @property
    def live(self) -> ServedVersion:
        return self.served[self.table.live]

    def apply(self, table: VersionTable) -> str:
        """Switch to ``table`` unless it is older than the one held; returns the live version."""
        if table.serial < self.table.serial:
            return self.table.live
        served = {v: self.served.get(v) or self._build(v, table.packages[v], table.apps[v]) for v in table.packages}
        self.served, self.table = served, table  # the switch: readers see the old or the new, whole
        return table.live

    def pick(self, version: str) -> ServedVersion:
        """The version a request asked for ('' = the live one); ModelNotFound if it is not up."""
        from serving.api.errors import ModelNotFound, quoted

        if not version:
            return self.served[self.table.live]
        found = self.served.get(version)
        if found is None:
            raise ModelNotFound(f"version {quoted(version)} is not served here (up: {sorted(self.served)}, "
                                f"live: {self.table.live!r})")
        return found

    def enter(self, version: str) -> None:
        self.in_flight[version] = self.in_flight.get(version, 0) + 1

    def leave(self, version: str) -> None:
        self.in_flight[version] -= 1
