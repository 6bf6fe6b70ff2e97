"""deploy/rayservice.yaml follows deploy/serve.yaml: the same application, the same args and
per-deployment settings, fading included; it differs only where a cluster must."""

from __future__ import annotations

from pathlib import Path

import yaml

from serving.api.wire import GRPC_SERVICERS
from serving.config import AppArgs, BatchingConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# args a cluster sets differently: the package on its volume, the device of its nodes, the routers'
# scale and the door they share
CLUSTER_ARGS = {"package", "device", "router_replicas", "router_max_replicas", "max_in_flight", "max_queued"}
LOCAL_ARGS = {"grpc_listen"}  # the local file's routers serve gRPC themselves; the cluster's proxy does


def _configs() -> tuple[dict, dict, list[dict]]:
    serve = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    docs = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    ray_service = next(d for d in docs if d["kind"] == "RayService")
    return serve, yaml.safe_load(ray_service["spec"]["serveConfigV2"]), docs


def test_both_serve_the_same_application_over_the_same_grpc_services():
    """The cluster's Serve proxy (its Service points at it) and the local file's routers, which
    serve the same services themselves on the proxy's port (--ingress shared: Serve's proxy off)."""
    local, cluster, _ = _configs()
    assert cluster["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICERS
    assert local["grpc_options"]["grpc_servicer_functions"] == []
    listen = AppArgs(**local["applications"][0]["args"]).grpc_listen
    assert listen.rsplit(":", 1) == ["127.0.0.1", str(cluster["grpc_options"]["port"])]
    [app], [cluster_app] = local["applications"], cluster["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert cluster_app[key] == app[key], key


def test_the_args_are_the_same_keys_and_values_except_package_and_device():
    local, cluster, _ = _configs()
    args, cluster_args = local["applications"][0]["args"], cluster["applications"][0]["args"]
    assert set(cluster_args) - CLUSTER_ARGS == set(args) - LOCAL_ARGS - CLUSTER_ARGS
    assert {k: v for k, v in cluster_args.items() if k not in CLUSTER_ARGS} == \
        {k: v for k, v in args.items() if k not in CLUSTER_ARGS | LOCAL_ARGS}
    AppArgs(**cluster_args)  # valid: unknown keys or bad values would raise
    assert cluster_args["feature_filter"] == "serving.fading.runtime:router_filter"


def test_every_deployment_has_the_same_settings_only_its_scale_differs():
    local, cluster, _ = _configs()
    deployments = {d["name"]: d for d in local["applications"][0]["deployments"]}
    cluster_deployments = {d["name"]: d for d in cluster["applications"][0]["deployments"]}
    assert set(cluster_deployments) == set(deployments)
    for name, d in deployments.items():
        c = cluster_deployments[name]
        assert set(c) == set(d), name
        # the local Router counts its requests itself (InFlightPolicy): the cluster's pass Serve's proxy
        assert set(c["autoscaling_config"]) == set(d["autoscaling_config"]) - ({"policy"} if name == "Router" else set()), name
        for key in ("max_ongoing_requests", "max_queued_requests", "health_check_period_s"):
            assert c.get(key) == d.get(key) or name == "Router", (name, key)  # the routers: their share, below
        if "user_config" in d:
            BatchingConfig(**c["user_config"])


def test_routers_on_the_workers_follow_the_fading_control_sidecar_of_the_head():
    _, _, docs = _configs()
    ray_service = next(d for d in docs if d["kind"] == "RayService")
    service = next(d for d in docs if d["kind"] == "Service")
    cluster = ray_service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]
    sidecar = next(c for c in head["spec"]["containers"] if c["name"] == "fading-control")
    port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "fading")
    assert sidecar["command"][:3] == ["recserve", "fade", "serve"] and str(port) in sidecar["command"]
    head_labels = {**head["metadata"]["labels"], "ray.io/node-type": "head"}  # KubeRay adds the node type
    assert set(service["spec"]["selector"].items()) <= set(head_labels.items())
    address = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RECSERVE_FADE_ADDR"]["value"] == address
            assert "RECSERVE_FADE_TOKEN" in env


def test_shards_and_tower_autoscale_on_how_busy_they_are_in_both_files():
    """The router coalesces requests, so calls in flight never reach a shard's target: both files
    scale shards and tower with BusyPolicy, and Serve accepts each autoscaling_config as written."""
    from ray.serve.config import AutoscalingConfig

    from serving.app.autoscaling import BusyPolicy

    local, cluster, _ = _configs()
    for config in (local, cluster):
        [app] = config["applications"]
        assert app["args"]["transport"] == "direct"
        for d in app["deployments"]:
            parsed = AutoscalingConfig(**d["autoscaling_config"])
            if d["name"] == "Router":  # the local file: the routers serve gRPC themselves and count their requests
                wanted = "serving.app.autoscaling:InFlightPolicy" if config is local else None
                assert (None if parsed.policy.is_default_policy_function() else parsed.policy.policy_function) == wanted
                continue
            assert parsed.policy.policy_function == "serving.app.autoscaling:BusyPolicy", d["name"]
            BusyPolicy(**parsed.policy.policy_kwargs)  # the kwargs the controller will pass


def _hosts_docs() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "rayservice-hosts.yaml").read_text()))


def test_the_hosts_variant_is_rayservice_yaml_plus_placement_only():
    _, cluster, docs = _configs()
    hosts_docs = _hosts_docs()
    ray_service, hosts_service = (next(d for d in ds if d["kind"] == "RayService") for ds in (docs, hosts_docs))
    placed = yaml.safe_load(hosts_service["spec"]["serveConfigV2"])
    args = placed["applications"][0].pop("args")
    assert {k: v for k, v in args.items() if k not in ("place_on_hosts", "router_host", "tower_host")} == \
        cluster["applications"][0].pop("args")
    assert placed == cluster, "serveConfigV2 differs only in the placement args"
    assert args["place_on_hosts"] is True
    AppArgs(**args)
    one, other = ray_service["spec"]["rayClusterConfig"], hosts_service["spec"]["rayClusterConfig"]
    assert other["headGroupSpec"] == one["headGroupSpec"]
    worker = one["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    for group in other["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["env"] == worker["env"] and container["image"] == worker["image"], group["groupName"]
    assert [d for d in hosts_docs if d["kind"] != "RayService"] == [d for d in docs if d["kind"] != "RayService"]


def test_each_host_group_is_one_labelled_node_and_the_placement_code_fills_the_shard_hosts():
    """The hosts the file starts, as serving/app/nodes.py reads them from Ray (label -> memory), take
    criteo-kaggle's full tables in 2 shards: the shards go to h1/h2, nothing to h0, router and
    tower to h0."""
    from recserve.planning import plan_workload
    from recserve.workloads import load_workload
    from serving.app.nodes import HOST_LABEL, node_placement

    hosts_service = next(d for d in _hosts_docs() if d["kind"] == "RayService")
    args = yaml.safe_load(hosts_service["spec"]["serveConfigV2"])["applications"][0]["args"]
    hosts = {}
    for group in hosts_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1, group["groupName"]
        hosts[group["labels"][HOST_LABEL]] = int(group["rayStartParams"]["memory"])
    assert {args["router_host"], args["tower_host"]} <= set(hosts)
    plan = plan_workload(load_workload("criteo-kaggle"), strategy="load", num_shards=2)
    placed = node_placement(plan, hosts, router_host=args["router_host"], tower_host=args["tower_host"])
    shard_hosts = {h for sh in placed.assignment.shards for h in sh}
    assert shard_hosts <= set(hosts) - {args["router_host"]} and shard_hosts, placed.assignment
    assert placed.router_options() == {"label_selector": {HOST_LABEL: f"in({args['router_host']})"}}


def test_each_files_routers_take_their_share_of_its_door_and_scale_as_its_args_say():
    """Serve's door of each Router replica (max_ongoing/max_queued_requests) is the args' router_door(),
    the stack's max_in_flight and max_queued shared by the most routers the autoscaling runs, and
    each scales on half of it; a file that said otherwise would admit more than its args intend."""
    local, cluster, _ = _configs()
    for config in (local, cluster):
        [app] = config["applications"]
        args = AppArgs(**app["args"])
        router = next(d for d in app["deployments"] if d["name"] == "Router")
        assert (router["max_ongoing_requests"], router["max_queued_requests"]) == args.router_door()
        scaling = router["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (args.router_replicas, args.router_max_replicas)
        assert scaling["target_ongoing_requests"] == args.router_door()[0] // 2
