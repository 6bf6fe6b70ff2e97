"""Scale one deployment of a running stack through the Ray dashboard's Serve REST API.

    POST {dashboard}/api/v1/applications/{app}/deployments/{deployment}/scale
         {"target_num_replicas": N}

Ray 2.60's external scaling API: the controller sets that deployment's target and nothing
else, so the other deployments keep their replica processes (no redeploy). It needs the app
deployed with ``external_scaler_enabled=True`` (``recserve serve`` does) and no
autoscaling_config on it. The dashboard asks for Ray's token (token auth): read from
$RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, sent as
``Authorization: Bearer``.

Standard library only.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


class ScaleError(RuntimeError):
    """Scaling failed or cannot start; the message says why."""


def ray_token() -> str | None:
    """Ray's auth token, where Ray looks for it; None if there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _request(url: str, body: dict | None = None, *, timeout_s: float = 30.0) -> dict:
    headers = {"Content-Type": "application/json"}
    token = ray_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        hint = " (the Ray token: see docs/operations.md, Dashboard)" if e.code == 401 else ""
        raise ScaleError(f"{url}: HTTP {e.code}: {detail}{hint}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ScaleError(f"{url}: {e} (is the stack running? its dashboard URL is printed by recserve serve)") from e


def serve_details(dashboard: str) -> dict:
    """Serve's applications, deployments and replicas (GET /api/serve/applications/)."""
    return _request(f"{dashboard.rstrip('/')}/api/serve/applications/")


def replicas(details: dict, app: str, deployment: str) -> list[dict]:
    """The replicas of one deployment: dicts with replica_id, state, pid, actor_id, ..."""
    apps = details.get("applications") or {}
    if app not in apps:
        raise ScaleError(f"no application {app!r} (running: {sorted(apps) or 'none'})")
    deployments = apps[app].get("deployments") or {}
    if deployment not in deployments:
        raise ScaleError(f"no deployment {deployment!r} in {app!r} (deployments: {sorted(deployments)})")
    return list(deployments[deployment].get("replicas") or [])


def app_of(details: dict, deployment: str, router_app: str = "recserve") -> str:
    """The application of ``router_app``'s stack that holds ``deployment``: the router's own
    app, or the one version app (``router_app@version``, serving/app/versions.py) holding it.
    While a swap runs two versions are up: ScaleError asks to name one."""
    apps = details.get("applications") or {}
    holding = sorted(a for a in apps if (a == router_app or a.startswith(f"{router_app}@"))
                     and deployment in (apps[a].get("deployments") or {}))
    if len(holding) == 1:
        return holding[0]
    if not holding:
        names = sorted({d for a in apps if a == router_app or a.startswith(f"{router_app}@")
                        for d in (apps[a].get("deployments") or {})})
        raise ScaleError(f"no deployment {deployment!r} in the stack {router_app!r} (deployments: {names})")
    raise ScaleError(f"{deployment!r} runs in {holding} (a version swap under way?); name one with --app")


def scale_deployment(
    dashboard: str,
    deployment: str,
    num_replicas: int,
    *,
    app: str = "recserve",
    timeout_s: float = 300.0,
    progress: Callable[[str], None] = lambda line: None,
) -> list[dict]:
    """Set ``deployment``'s replica count and wait until exactly that many run; returns them."""
    if num_replicas < 1:
        raise ScaleError(f"replicas: must be >= 1, got {num_replicas}")
    replicas(serve_details(dashboard), app, deployment)  # names checked before anything changes
    base = dashboard.rstrip("/")
    _request(f"{base}/api/v1/applications/{app}/deployments/{deployment}/scale",
             {"target_num_replicas": num_replicas})
    progress(f"{deployment}: target {num_replicas} replica(s) set; waiting for them ...")
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        current = replicas(serve_details(dashboard), app, deployment)
        states = sorted(r.get("state", "?") for r in current)
        running = [r for r in current if r.get("state") == "RUNNING"]
        line = f"{deployment}: {len(running)}/{num_replicas} running" + (
            f" ({', '.join(s for s in states if s != 'RUNNING')})" if len(running) != len(current) else "")
        if line != last:
            progress(line)
            last = line
        if len(running) == num_replicas == len(current):
            return running
        if time.monotonic() > deadline:
            raise ScaleError(f"{deployment}: {line} after {timeout_s:.0f}s (resources? see the dashboard's Serve page)")
        time.sleep(1.0)
