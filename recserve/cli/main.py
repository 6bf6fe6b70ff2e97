"""The ``recserve`` command line.

Each area registers its own subcommands through a ``register(subparsers)`` function in a
light module (argparse only; heavy imports happen inside the command), listed in
``COMMAND_MODULES``. A command's handler takes the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib

# module:function pairs; each adds one or more subcommands
COMMAND_MODULES = (
    "recserve.cli.model:register",  # train, export, default-package, inspect
    "recserve.planning:register",  # plan
    "recserve.cli.distill:register",  # teacher score, synth labels
    "recserve.cli.serve:register",  # serve
    "recserve.cli.deploy:register",  # deploy (a new model version into a running stack)
    "recserve.cli.kernels:register",  # kernels search / bench
    "recserve.cli.bench:register",  # bench
    "recserve.cli.fade:register",  # fade
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recserve",
        description="Serve sharded DLRM/DCNv2 recommendation models on Ray Serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in COMMAND_MODULES:
        module_name, func = spec.split(":")
        getattr(importlib.import_module(module_name), func)(sub)  # every area is built: a failed import is a bug
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)

