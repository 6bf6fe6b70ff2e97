"""``python -m kernels search|bench ...``: the same commands as ``recserve kernels``, for
machines that have only torch and triton (no Ray, no torchrec)."""

import argparse
import sys

from kernels.commands import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kernels", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
