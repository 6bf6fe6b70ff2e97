"""The recserve command line: every area's commands are there (an area that fails to import
is an error, never a silently missing command)."""

from __future__ import annotations

import argparse

from recserve.cli import build_parser


def test_every_area_registers_its_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "export", "inspect", "plan", "serve", "kernels", "bench", "fade"} <= set(sub.choices)
