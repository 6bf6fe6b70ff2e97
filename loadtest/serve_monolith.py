"""Run the monolithic server in this process until SIGINT/SIGTERM (used by the bench).

    python -m loadtest.serve_monolith PACKAGE --port 9100

Prints ``PORT <n>`` once it answers; listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio


async def _serve(package: str, port: int, max_in_flight: int, device: str) -> None:
    from serving.standalone.monolith import create_server
    from serving.ops.server_thread import serve_until_signalled

    server, bound = await create_server(package, port, host="127.0.0.1", max_in_flight=max_in_flight, device=device)
    print(f"PORT {bound}", flush=True)
    await serve_until_signalled(server, grace_s=1.0, name="serve_monolith")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.serve_monolith")
    p.add_argument("package")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--device", default="cpu", help="torch device of the shards and tower (cpu, cuda)")
    args = p.parse_args(argv)
    asyncio.run(_serve(args.package, args.port, args.max_in_flight, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
