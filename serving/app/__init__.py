"""The Ray Serve app: deployments around the engine's cores, wired by a typed builder.

  builder.py      build_app(AppArgs) -> Application (named by deploy/serve.yaml's import_path)
  deployments.py  Router (gRPC ingress), Shard (one deployment per shard), DenseTower, VersionFront
  placement.py    Ray GPU shares per replica, from the same slot arithmetic as the planner
  versions.py     model versions side by side: the version table, its storage, the rollout
"""
