"""Standalone servers: plain grpc.aio processes, no Ray.

  monolith.py   the whole model (engine's LocalRanker) behind the Ranker API in one process:
                ``recserve serve --monolith``, the single-server baseline (MonolithThread)
  tls_front.py  a TLS front that forwards to the loopback gRPC port: ``recserve tls-front``
"""
