"""recserve online serving: the gRPC Ranker API over sharded embedding tables.

Grouped by where the code runs; layers only point down (pyproject.toml's import-linter
contracts, checked by `make lint`):

  app/          the Ray Serve app: deployments, the builder deploy/serve.yaml names, versions
  standalone/   plain grpc.aio servers, no Ray: the monolith, the TLS front
  teacher.py    the teacher scoring job over the example log (Ray Data; recserve teacher score)
  example_log.py  served examples logged for distillation (both servers)
  fading/       feature fading: policy, schedule, store, control-plane service, router filter
  engine/       the Ray-free cores both servers share: routing, shard, tower, LocalRanker, admission
  api/          the wire: names, codec, typed errors and their status codes, the client
  ops/          running a stack on a machine: ports, loopback, scaling, the server thread
  config.py     AppArgs: the typed serving settings (and the CLI flags made from them)

See docs/serving.md.
"""
