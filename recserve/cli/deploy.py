"""``recserve deploy PACKAGE``: switch a running stack to a new model version with no failed
request (serving/app/rollout.py). Light module: argparse only at import time."""

from __future__ import annotations

import argparse

from recserve.cli.types import Subcommand
from serving.app.versions import ROUTER_APP


class Deploy(Subcommand):
    name = "deploy"
    help = "deploy a new model version into a running recserve stack (zero failed requests)"
    description = ("Check PACKAGE (manifest schema and every sha256: a bad package is refused before anything "
                   "changes), start its shards and dense tower beside the running version, warm it up through the "
                   "router with requests pinned to it, switch every router replica to it at once, drain and stop the "
                   "old version. While both are up a request may pin either with PredictRequest.version.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("package", help="model package directory (recserve export)")
        p.add_argument("--address", default=None,
                       help="Ray GCS address of the running stack (default: the running recserve serve's, from its "
                            "state file; else the Ray instance last started on this machine)")
        p.add_argument("--app", default=ROUTER_APP, help=f"the router application's name (default {ROUTER_APP})")
        p.add_argument("--drain-s", type=float, default=30.0, help="longest wait for the old version's requests")
        p.add_argument("--ready-timeout-s", type=float, default=300.0, help="longest wait for the new replicas")

    def run(self, args: argparse.Namespace) -> int:
        return run_deploy(args)


COMMANDS = (Deploy,)


def run_deploy(args: argparse.Namespace) -> int:
    import sys

    from serving.app.rollout import DeployTimings, VersionRefused, check_package

    try:  # the package's own checks first: no Ray connection for a package that cannot go live
        manifest = check_package(args.package)
    except VersionRefused as e:
        print(f"recserve deploy: refused: {e}", file=sys.stderr)
        return 2
    address = args.address or _running_address() or "auto"
    if address.startswith(("127.0.0.1:", "localhost:")):
        # a `recserve serve` stack runs Ray in its single-machine mode (serving/ops/loopback.py); without
        # it this driver turns 127.0.0.1 into the machine's address, where that GCS does not listen
        import os

        from serving.ops.loopback import ray_on_loopback

        ray_on_loopback()
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # its local Ray 2.60 asks every client for the token
    import ray

    from serving.app.rollout import deploy

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        table = deploy(args.package, router_app=args.app,
                       timings=DeployTimings(drain_s=args.drain_s, ready_timeout_s=args.ready_timeout_s),
                       progress=lambda line: print(f"recserve deploy: {line}", flush=True))
    except VersionRefused as e:
        print(f"recserve deploy: refused: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"recserve deploy: {manifest.name} {table.live} is live", flush=True)
    return 0


def _running_address() -> str | None:
    """The GCS address the running ``recserve serve`` recorded (recserve/cli/serve.py state file)."""
    import json

    from serving.ops.state import state_path

    try:
        return json.loads(state_path().read_text()).get("ray_address")
    except (OSError, ValueError):
        return None
