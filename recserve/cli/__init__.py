"""The ``recserve`` command line: every subcommand, one module per area.

  main.py     build_parser() and main(): the commands, in the order ``recserve --help`` lists them
  types.py    Subcommand: the one shape of a command (name, help, add_arguments, run; or verbs)
  model.py    train, export, default-package, inspect
  plan.py     plan
  distill.py  teacher score, synth labels
  serve.py    serve (Ray Serve stack or --monolith), scale, tls-front
  deploy.py   deploy: a new model version into a running stack
  kernels.py  kernels search, kernels bench
  bench.py    bench: load tests against the monolith and the Serve stack
  fade.py     fade: feature fading's control plane

Light modules: argparse at import time; a command's heavy imports happen when it runs.
"""

from recserve.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
