"""The state file a running ``recserve serve`` leaves (its dashboard, gRPC port, Ray
address, metrics endpoint, pid) for ``recserve scale``, ``recserve deploy`` and
deploy/check_prometheus.py; removed when it stops."""

from __future__ import annotations


def state_path():
    """Where a running ``recserve serve`` leaves its addresses for ``recserve scale``."""
    from recserve.default_package import artifacts_dir

    return artifacts_dir() / "serving.json"


def write_state(**state) -> None:
    import json
    import os

    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**state, "pid": os.getpid()}, indent=1) + "\n")


def clear_state() -> None:
    import json
    import os

    path = state_path()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
