"""What the router's liveness check costs its process: ``serve.status()`` against the controller's
details as they arrive (``get_serve_details()``, what serving/app/deployments.py reads since the
seventh session), on a Serve app shaped like the stack (a Router over two shards and a tower,
trivial replicas). A router runs the check once a call has waited ``shard_down_after_s``, at most
every 0.5 s, so it is paid exactly when the router is slow. Prints CPU and wall ms per check.

    RAY_AUTH_MODE=token .venv/bin/python benchmarks/liveness_check_cpu.py
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Part:
            def __call__(self) -> int:
                return 1

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Router:
            def __init__(self, *parts) -> None:
                self.parts = parts

            def __call__(self) -> int:
                return 1

        serve.run(Router.bind(*(Part.options(name=n).bind() for n in ("shard-0", "shard-1", "DenseTower"))),
                  name="recserve", route_prefix=None)
        client = _get_global_client()

        def per_call(fn) -> tuple[float, float]:
            fn()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(args.repeat):
                fn()
            return ((time.process_time() - cpu) / args.repeat * 1000, (time.perf_counter() - wall) / args.repeat * 1000)

        print(f"{'check':<24} {'CPU ms':>7} {'wall ms':>8}   ({args.repeat} checks, 4 deployments)")
        for name, fn in (("serve.status()", lambda: serve.status().applications["recserve"]),
                         ("get_serve_details()", lambda: client.get_serve_details()["applications"]["recserve"])):
            cpu, wall = per_call(fn)
            print(f"{name:<24} {cpu:>7.1f} {wall:>8.1f}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
