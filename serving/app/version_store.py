"""The version table and the stack's settings in Ray's GCS key-value store, under the router
app's name: a router replica that starts later, and a later ``recserve deploy``, read the same."""

from __future__ import annotations

from serving.app.versions import ROUTER_APP, VersionTable

_KV_NAMESPACE = "recserve"


def _key(router_app: str) -> bytes:
    return f"versions/{router_app}".encode()


def load_table(router_app: str = ROUTER_APP) -> VersionTable | None:
    """The stored table of ``router_app`` (None before the first version is registered)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_key(router_app), namespace=_KV_NAMESPACE)
    return None if raw is None else VersionTable.from_json(raw)


def store_table(table: VersionTable, router_app: str = ROUTER_APP) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_key(router_app), table.to_json().encode(), overwrite=True, namespace=_KV_NAMESPACE)


def clear_table(router_app: str = ROUTER_APP) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_key(router_app), namespace=_KV_NAMESPACE)
    internal_kv._internal_kv_del(_args_key(router_app), namespace=_KV_NAMESPACE)


def _args_key(router_app: str) -> bytes:
    return f"args/{router_app}".encode()


def store_args(args_json: str, router_app: str = ROUTER_APP) -> None:
    """The stack's AppArgs (JSON): a new version is started with the same settings."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_args_key(router_app), args_json.encode(), overwrite=True, namespace=_KV_NAMESPACE)


def load_args(router_app: str = ROUTER_APP) -> str | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_args_key(router_app), namespace=_KV_NAMESPACE)
    return None if raw is None else raw.decode()
