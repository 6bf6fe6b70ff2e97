"""recserve online serving: the gRPC Ranker API over sharded embedding tables.

Ray-free cores (usable in one process and unit-testable):
  codec.py     PredictRequest -> validated Batch, scores -> PredictResponse
  routing.py   split a Batch into per-shard lookups by the plan; assemble shard outputs
  shard.py     one shard: its tables' slices, rebased ids, one table-batched lookup
  tower.py     the dense tower: bottom MLP -> interaction -> top MLP -> sigmoid
  pipeline.py  the whole model in one process (LocalRanker), used by monolith.py
  errors.py    typed errors; status.py maps them to gRPC codes (the one place)
Ray Serve: deployments.py (Router, Shard, DenseTower), app.py (build_app).
"""
