"""``recserve fade ...``: drive feature fading through the FadingControl API.

    recserve fade serve --tokens-file tokens.txt            # the control plane (port 50061)
    export RECSERVE_FADE_TOKEN=...                           # the client's bearer token
    recserve fade start criteo-kaggle cat_2 --steps 1,0.75,0.5,0.25,0 --soak 10m
    recserve fade status criteo-kaggle
    recserve fade pause|resume|rollback criteo-kaggle cat_2 --reason "..."
    recserve fade set criteo-kaggle cat_2 0.5
    recserve fade audit
    recserve fade reclaim --package artifacts/default       # memory freed by dropping done features

Light module: argparse only at import; each handler imports what it needs and returns an
exit code (0 ok, 1 refused by the server, 2 bad input).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recserve.cli.types import Subcommand

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default=None, help="FadingControl host:port (default $RECSERVE_FADE_ADDR or 127.0.0.1:50061)")
    p.add_argument("--token", default=None, help="bearer token (default $RECSERVE_FADE_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")


def _feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name (as in the package manifest)")
    p.add_argument("feature", help="sparse feature name")
    p.add_argument("--reason", default="", help="recorded in the audit log")


class Serve(Subcommand):
    name = "serve"
    help = "run the FadingControl gRPC server over the fading store"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", type=Path, default=None, help="SQLite store (default $RECSERVE_FADE_STORE or artifacts/fading.sqlite)")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=50061)
        p.add_argument("--tokens-file", type=Path, default=None, help="lines of 'principal token' (and/or $RECSERVE_FADE_TOKEN)")

    def run(self, args: argparse.Namespace) -> int:
        return run_serve(args)


class Start(Subcommand):
    name = "start"
    help = "start a coverage schedule for a feature"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        _feature_args(p)
        p.add_argument("--steps", default="1,0.75,0.5,0.25,0", help="coverages, not increasing (default 1,0.75,0.5,0.25,0)")
        p.add_argument("--soak", default="10m", help="soak per step: 30s, 10m, 1h, or one per step comma-separated")
        p.add_argument("--control", type=float, default=None, help="control cohort share held at full coverage (default 0.05)")
        p.add_argument("--salt", default=None, help="keep-decision salt (a new salt fades a different set of units)")
        p.add_argument("--max-mean-shift", type=float, default=None, help="guardrail: |mean faded/control - 1| (0.05)")
        p.add_argument("--max-psi", type=float, default=None, help="guardrail: PSI faded vs control (0.1)")
        p.add_argument("--max-latency-ratio", type=float, default=None, help="guardrail: latency with/without faded (1.5)")
        p.add_argument("--min-examples", type=int, default=None, help="examples per cohort before judging (2000)")
        _client_args(p)

    def run(self, args: argparse.Namespace) -> int:
        return run_start(args)


class _OneFeature(Subcommand):
    """A verb that names one feature and calls the FadingClient method of its own name."""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        _feature_args(p)
        _client_args(p)

    def run(self, args: argparse.Namespace) -> int:
        return _rpc(args, lambda c: getattr(c, self.name)(args.model, args.feature, args.reason))


class Pause(_OneFeature):
    name = "pause"
    help = "hold a running schedule at its current coverage"


class Resume(_OneFeature):
    name = "resume"
    help = "continue a paused or rolled-back schedule (the step's soak starts over)"


class Rollback(_OneFeature):
    name = "rollback"
    help = "go back to the last safe coverage"


class Set(Subcommand):
    name = "set"
    help = "set a feature's coverage by hand (stops its schedule)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        _feature_args(p)
        p.add_argument("coverage", type=float, help="in [0, 1]")
        _client_args(p)

    def run(self, args: argparse.Namespace) -> int:
        return run_set(args)


class Status(Subcommand):
    name = "status"
    help = "coverage, schedule and guardrail figures of faded features"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("model", nargs="?", default="", help="only this model")
        p.add_argument("--feature", default="", help="only this feature")
        _client_args(p)

    def run(self, args: argparse.Namespace) -> int:
        return run_status(args)


class Audit(Subcommand):
    name = "audit"
    help = "the audit log: who changed what, when, from -> to"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("model", nargs="?", default="")
        p.add_argument("--limit", type=int, default=50)
        _client_args(p)

    def run(self, args: argparse.Namespace) -> int:
        return run_audit(args)


class Reclaim(Subcommand):
    name = "reclaim"
    help = "shard memory and lookups freed by dropping features faded to 0"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--package", type=Path, required=True, help="the served model package")
        p.add_argument("--store", type=Path, default=None, help="read the state from this store file instead of the server")
        _client_args(p)

    def run(self, args: argparse.Namespace) -> int:
        return run_reclaim(args)


class Fade(Subcommand):
    name = "fade"
    help = "fade features out at serving time (coverage schedules, guardrails)"
    verbs = (Serve, Start, Pause, Resume, Rollback, Set, Status, Audit, Reclaim)


COMMANDS = (Fade,)


# ---- handlers ---------------------------------------------------------------------------------


def _client(args):
    from serving.fading.client import FadingClient

    return FadingClient(args.addr, token=args.token or os.environ.get("RECSERVE_FADE_TOKEN"))


def _rpc(args, call) -> int:
    """Run ``call(client)``, print the reply; map gRPC errors to exit codes."""
    import grpc

    try:
        with _client(args) as c:
            reply = call(c)
    except grpc.RpcError as e:
        print(f"recserve fade {args.fade_command}: {e.code().name}: {e.details()}", file=sys.stderr)
        bad = e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        return EXIT_BAD_INPUT if bad else EXIT_REFUSED
    print(_render(reply, as_json=args.json))
    return 0


def _render(reply, *, as_json: bool) -> str:
    from google.protobuf.json_format import MessageToJson

    from recserve.v1 import fading_pb2
    from serving.fading.format import format_audit, format_status

    if as_json:
        return MessageToJson(reply, preserving_proto_field_name=True)
    if isinstance(reply, fading_pb2.StatusResponse):
        return format_status(list(reply.features))
    if isinstance(reply, fading_pb2.AuditResponse):
        return format_audit(list(reply.entries))
    return format_status([reply])


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from serving.fading.service import load_tokens, serve_forever
    from serving.fading.store import FadingStore, StoreError, default_store_path

    try:
        tokens = load_tokens(args.tokens_file)
        if not tokens:
            raise ValueError("no tokens: pass --tokens-file or set RECSERVE_FADE_TOKEN")
        store = FadingStore(args.store or default_store_path())
    except (OSError, ValueError, StoreError) as e:
        print(f"recserve fade serve: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        asyncio.run(serve_forever(store, tokens=tokens, port=args.port, host=args.host))
    except KeyboardInterrupt:
        pass
    return 0


def run_start(args: argparse.Namespace) -> int:
    import dataclasses

    from serving.fading.schedule import Schedule, Thresholds

    try:
        schedule = Schedule.parse(args.steps, args.soak)
        overrides = {
            k: v
            for k, v in (
                ("max_mean_shift", args.max_mean_shift),
                ("max_psi", args.max_psi),
                ("max_latency_ratio", args.max_latency_ratio),
                ("min_examples", args.min_examples),
            )
            if v is not None
        }
        thresholds = dataclasses.replace(Thresholds(), **overrides)
    except ValueError as e:
        print(f"recserve fade start: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _rpc(
        args,
        lambda c: c.start(
            args.model, args.feature, schedule, thresholds=thresholds,
            control_fraction=args.control, salt=args.salt, reason=args.reason,
        ),
    )


def run_set(args: argparse.Namespace) -> int:
    return _rpc(args, lambda c: c.set_coverage(args.model, args.feature, args.coverage, args.reason))


def run_status(args: argparse.Namespace) -> int:
    return _rpc(args, lambda c: c.status(args.model, args.feature))


def run_audit(args: argparse.Namespace) -> int:
    return _rpc(args, lambda c: c.audit(args.model, args.limit))


def run_reclaim(args: argparse.Namespace) -> int:
    from recserve.package import ModelPackage, PackageError
    from serving.fading.reclaim import reclaim_report

    try:
        manifest = ModelPackage.open(args.package).manifest
    except PackageError as e:
        print(f"recserve fade reclaim: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.store is not None:
        from serving.fading.store import FadingStore

        states = FadingStore(args.store).states(manifest.name)
    else:
        import grpc

        from serving.fading.proto import state_from_proto

        try:
            with _client(args) as c:
                states = [state_from_proto(s) for s in c.status(manifest.name).features]
        except grpc.RpcError as e:
            print(f"recserve fade reclaim: {e.code().name}: {e.details()}", file=sys.stderr)
            return EXIT_REFUSED
    report = reclaim_report(manifest, states)
    print(report)
    if report.reclaimable:
        drop = ",".join(sorted(set(report.drop_features) | set(manifest.dropped_features)))
        print("rebuild the package without them (scores do not change: they are already faded for everyone):")
        print(
            f"  recserve export --workload <{manifest.workload.name} workload> --state-dict <trained.pt> "
            f"--strategy {manifest.plan.strategy} --shards {manifest.plan.num_shards} --dtype {manifest.dtype} "
            f"--drop-features {drop} --out <new package>"
        )
    return 0
