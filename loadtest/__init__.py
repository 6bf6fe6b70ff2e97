"""Load tests and the distributed-inference benchmark (``recserve bench``).

- :mod:`loadtest.trace`: a seeded request trace from a workload, encoded for the gRPC API,
  with the fan-out each request causes under a sharding plan.
- :mod:`loadtest.driver`: open-loop (fixed offered rate) and closed-loop senders.
- :mod:`loadtest.stats`: latency percentiles and the per-run summary row.
- :mod:`loadtest.cpu`: CPU busy time of the server's processes.
- :mod:`loadtest.report`: CSV, PNG plot and printed table.
- :mod:`loadtest.targets`: the servers under test (monolith, sharded Ray Serve stack).
- :mod:`loadtest.bench`: runs configurations x rates and writes the report.
- ``loadtest/locustfile.py``: a locust user speaking the same API (own process, no Ray).
"""
