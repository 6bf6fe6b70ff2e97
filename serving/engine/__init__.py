"""The Ray-free engine: what one request's scores are computed with, shared by the Ray Serve
app (serving/app/) and the standalone monolith (serving/standalone/). No Ray, no gRPC server;
unit-testable in one process.

  routing.py       split a Batch into per-shard lookups by the plan; assemble shard outputs;
                   FeatureFilter, the fading hook, and its 'module:factory' loader
  shard.py         one shard: its tables' slices, rebased ids, one table-batched lookup
  tower.py         the dense tower: bottom MLP -> interaction -> top MLP -> sigmoid
  buckets.py       batch buckets: the shapes captured GPU work is padded to
  graphs.py        CUDA graphs of one replica's GPU step, one per bucket
  pooled.py        pooled embeddings between shards and tower, in their wire dtype
  local_ranker.py  the whole model in one process (LocalRanker)
  admission.py     admission control: shed at the door what cannot meet its deadline
  coalesce.py      adaptive coalescing of concurrent requests into one batched call
  stages.py        per-stage request times (recserve_stage_ms), read back by the bench
  occupancy.py     the time-weighted mean of a level (calls in a door, a busy core) since the last reading
"""
