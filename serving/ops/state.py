"""The state file a running ``recserve serve`` leaves (its dashboard, gRPC port, Ray
address, metrics endpoint, pid) for ``recserve scale``, ``recserve deploy`` and
deploy/check_prometheus.py; removed when it stops."""

from __future__ import annotations


class StackNotFound(RuntimeError):
    """No running ``recserve serve`` left its state file; the message names the file and what to pass instead."""


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


def read_state() -> dict:
    """The running stack's state; StackNotFound if the file is missing or unreadable, or the
    ``recserve serve`` that wrote it is gone (killed without its clean-up)."""
    import json
    import os

    path = state_path()
    try:
        state = json.loads(path.read_text())
    except OSError:
        raise StackNotFound(f"no running `recserve serve` found ({path} is missing)") from None
    except ValueError as e:
        raise StackNotFound(f"{path}: not a recserve state file ({e})") from None
    pid = state.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise StackNotFound(f"the `recserve serve` that wrote {path} (pid {pid}) is not running") from None
        except PermissionError:  # alive, another user's
            pass
    return state


def clear_state() -> None:
    import json
    import os

    path = state_path()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
