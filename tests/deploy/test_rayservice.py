"""deploy/rayservice.yaml follows deploy/serve.yaml: the same application, the same args and
per-deployment settings, fading included; it differs only where a cluster must."""

from __future__ import annotations

from pathlib import Path

import yaml

from serving.api.wire import GRPC_SERVICERS
from serving.config import AppArgs, BatchingConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# args a cluster sets differently: the package on its volume, the device of its nodes
CLUSTER_ARGS = {"package", "device"}


def _configs() -> tuple[dict, dict, list[dict]]:
    serve = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    docs = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    ray_service = next(d for d in docs if d["kind"] == "RayService")
    return serve, yaml.safe_load(ray_service["spec"]["serveConfigV2"]), docs


def test_both_serve_the_same_application_over_the_same_grpc_services():
    local, cluster, _ = _configs()
    for config in (local, cluster):
        assert config["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICERS
    assert cluster["grpc_options"]["port"] == local["grpc_options"]["port"]
    [app], [cluster_app] = local["applications"], cluster["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert cluster_app[key] == app[key], key


def test_the_args_are_the_same_keys_and_values_except_package_and_device():
    local, cluster, _ = _configs()
    args, cluster_args = local["applications"][0]["args"], cluster["applications"][0]["args"]
    assert set(cluster_args) == set(args)
    assert {k: v for k, v in cluster_args.items() if k not in CLUSTER_ARGS} == \
        {k: v for k, v in args.items() if k not in CLUSTER_ARGS}
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
        assert set(c["autoscaling_config"]) == set(d["autoscaling_config"]), name
        for key in ("max_ongoing_requests", "max_queued_requests", "health_check_period_s"):
            assert c.get(key) == d.get(key), (name, key)
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
            if d["name"] == "Router":
                assert parsed.policy.is_default_policy_function()
                continue
            assert parsed.policy.policy_function == "serving.app.autoscaling:BusyPolicy", d["name"]
            BusyPolicy(**parsed.policy.policy_kwargs)  # the kwargs the controller will pass
