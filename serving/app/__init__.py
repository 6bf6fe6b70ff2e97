"""The Ray Serve app: deployments around the engine's cores, wired by a typed builder.

  builder.py        build_app(AppArgs) -> Application (named by deploy/serve.yaml's import_path)
  deployments.py    Router (gRPC ingress), Shard (one deployment per shard), DenseTower
  placement.py      Ray GPU shares per replica, from the same slot arithmetic as the planner
  versions.py       the version table (which versions are up, which is live); a router's view of it
  version_store.py  the table and the stack's settings in Ray's GCS key-value store
  rollout.py        the driver side: start a versioned stack, deploy a new version, switch, drain
"""
