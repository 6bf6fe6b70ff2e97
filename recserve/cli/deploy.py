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
                       help="Ray GCS address of the running stack, HOST:PORT (default: the running recserve serve's, "
                            "from its state file)")
        p.add_argument("--connect-timeout-s", type=float, default=60.0,
                       help="longest wait to attach to the stack's Ray (default 60)")
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
    from serving.app.rollout import deploy
    from serving.ops.attach import AttachError, attach, stack_address
    from serving.ops.state import StackNotFound

    try:
        address = stack_address(args.address)
        attach(address, timeout_s=args.connect_timeout_s, who="recserve deploy")
    except (StackNotFound, AttachError) as e:
        hint = "" if args.address else "; name the stack's Ray with --address HOST:PORT"
        print(f"recserve deploy: {e}{hint}", file=sys.stderr)
        return 2
    import ray

    print(f"recserve deploy: attached to the stack's Ray at {address}", flush=True)
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

