"""Serving-time feature fading with guardrails and rollback (README.md beside this file).

  policy.py      the deterministic keep decision; a faded feature becomes an empty bag
  schedule.py    coverage steps and soak times; states and their transitions (pure)
  guardrails.py  streaming faded / kept / control statistics and the breach test
  store.py       the shared, durable state: SQLite in WAL mode, with an audit log
  runtime.py     FadingFilter: the router's feature-filter step plus guardrails
  metrics.py     Prometheus metrics through ray.util.metrics
  service.py     the FadingControl gRPC servicer (bearer-token auth) and its server
  client.py      FadingClient (``recserve fade ...``, recserve/cli/fade.py, drives it)
  proto.py       fading state <-> its FadingControl messages, both ways
  format.py      the tables ``recserve fade status`` / ``audit`` print
  reclaim.py     shard memory and lookups freed by dropping fully faded features
"""
