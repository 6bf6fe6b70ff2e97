"""recserve online serving: the gRPC Ranker API over sharded embedding tables.

Ray-free cores (usable in one process and unit-testable):
  codec.py     PredictRequest -> validated Batch, scores -> PredictResponse
  routing.py   split a Batch into per-shard lookups by the plan; assemble shard outputs;
               FeatureFilter, the fading hook
  shard.py     one shard: its tables' slices, rebased ids, one table-batched lookup
  tower.py     the dense tower: bottom MLP -> interaction -> top MLP -> sigmoid
  local_ranker.py  the whole model in one process (LocalRanker)
  errors.py    typed errors; status.py maps them to gRPC codes (the one place)
  api.py       the wire: service name, method paths, the deadline header and its reader
Servers and tools:
  monolith.py       LocalRanker behind a plain grpc.aio server (create_server, MonolithThread)
  deployments.py    Ray Serve: Router (gRPC ingress), Shard (one deployment per shard), DenseTower
  app.py, config.py build_app(AppArgs) -> Application, named by deploy/serve.yaml
  client.py         RankingClient
  commands.py       `recserve serve`; default_model.py: which package 'default' names (never trains)
See serving/README.md.
"""
