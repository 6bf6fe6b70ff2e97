"""Autoscaling of shards and towers by how busy they are (Serve's custom autoscaling policy).

Serve's default policy scales a deployment by the requests in flight per replica. That count
does not measure a shard's or a tower's load here: the router coalesces concurrent requests into
one call per shard (serving/engine/coalesce.py), so a saturated shard may see one call at a
time and never reach any ``target_ongoing_requests``; and calls over the direct data plane
(serving/app/dataplane.py) bypass Serve's handles, whose counts feed that policy. Each shard and
tower replica therefore reports the fraction of time its core was busy (``BUSY_METRIC``, from
``record_autoscaling_stats``), and :class:`BusyPolicy` asks for enough replicas to bring the
mean down to ``target_busy``. deploy/serve.yaml names it::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      policy: {policy_function: serving.app.autoscaling:BusyPolicy, policy_kwargs: {target_busy: 0.6}}

The Router is scaled by requests in flight, as Serve's default policy does, except that with
``--ingress shared`` (AppArgs.grpc_listen) its requests never pass Serve: each replica serves
gRPC itself, so Serve counts none. Such a replica reports the mean number of requests in its
door (``IN_FLIGHT_METRIC``: working and waiting) and :class:`InFlightPolicy` asks for that sum
over ``target_ongoing_requests``, or Serve's own count where that is higher::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      target_ongoing_requests: 16
      policy: {policy_function: serving.app.autoscaling:InFlightPolicy}

Serve applies its own bounds, delays and smoothing factors to what the policy returns. Serve
pickles this module by value into its controller: it imports nothing of recserve.
"""

from __future__ import annotations

BUSY_METRIC = "recserve_busy"
IN_FLIGHT_METRIC = "recserve_in_flight"


class BusyPolicy:
    """Replicas wanted = the replicas' summed busy fraction / ``target_busy``, or Serve's own
    request-count estimate where that is higher (a deployment called without coalescing)."""

    def __init__(self, target_busy: float = 0.6):
        if not 0.0 < float(target_busy) <= 1.0:
            raise ValueError(f"target_busy: a fraction in (0, 1], got {target_busy!r}")
        self.target_busy = float(target_busy)

    def __call__(self, ctx) -> tuple[float, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        busy = (ctx.aggregated_metrics or {}).get(BUSY_METRIC, {})
        # a replica that has not reported yet (just started) counts as idle
        by_busy = sum(busy.get(r, 0.0) for r in ctx.running_replicas) / self.target_busy
        by_requests = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        return max(by_busy, by_requests), {}


class InFlightPolicy:
    """Replicas wanted = requests in flight / ``target_ongoing_requests``, counting the ones the
    replicas report themselves (a Router serving gRPC on its own: Serve sees none of them) or
    Serve's own count, whichever is higher."""

    def __call__(self, ctx) -> tuple[float, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        reported = (ctx.aggregated_metrics or {}).get(IN_FLIGHT_METRIC, {})
        own = sum(reported.get(r, 0.0) for r in ctx.running_replicas)
        return max(own, ctx.total_num_requests) / ctx.config.get_target_ongoing_requests(), {}
