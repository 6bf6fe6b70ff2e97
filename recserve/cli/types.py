"""The one shape of a ``recserve`` subcommand (after vLLM's ``CLISubcommand``)."""

from __future__ import annotations

import argparse
from typing import ClassVar


class Subcommand:
    """One command, ``recserve NAME`` (or one verb of it: ``recserve fade start``).

    ``name`` and ``help`` are what ``--help`` lists (``description``, when set, heads the
    command's own help). ``add_arguments`` declares its flags, argparse only: every module of
    the CLI is imported to build the parser, so heavy imports happen in ``run``, which does
    the work and returns the exit code. A command made of verbs lists them in ``verbs``
    (each a Subcommand of its own) and has no ``run``.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    description: ClassVar[str | None] = None
    verbs: ClassVar[tuple[type[Subcommand], ...]] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the command's arguments (none by default)."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError(f"recserve {self.name}: a command of verbs runs one of them")

    def add_to(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add this command's parser to ``subparsers``; its ``handler`` is :meth:`run` (or the
        chosen verb's)."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description or self.help)
        self.add_arguments(parser)
        if self.verbs:
            verbs = parser.add_subparsers(dest=f"{self.name.replace('-', '_')}_command", metavar="ACTION", required=True)
            for verb in self.verbs:
                verb().add_to(verbs)
        else:
            parser.set_defaults(handler=self.run)
        return parser
