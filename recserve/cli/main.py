"""The ``recserve`` command line: every subcommand, in the order ``recserve --help`` lists them.

Each module of recserve/cli/ defines its commands as :class:`recserve.cli.types.Subcommand`
classes and lists them in ``COMMANDS``; a command's handler takes the parsed args and
returns an exit code.
"""

from __future__ import annotations

import argparse

from recserve.cli import bench, deploy, distill, fade, kernels, model, plan, serve

COMMAND_MODULES = (model, plan, distill, serve, deploy, kernels, bench, fade)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recserve",
        description="Serve sharded DLRM/DCNv2 recommendation models on Ray Serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        for command in module.COMMANDS:
            command().add_to(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)
