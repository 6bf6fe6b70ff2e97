"""The default model, what ``make serve`` serves: criteo-kaggle with every table capped at
100,000 rows, trained on synthetic clicks (~15 s, held-out AUC ~0.86) and exported into
``artifacts/default`` (gitignored) by ``recserve default-package``, which ``make serve`` runs
first. Serving never trains: ``recserve serve`` without that package fails and names the
command that makes it.

Light module: the training and export imports happen inside :func:`build_default_package`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_ROWS = 100_000
STRATEGY, NUM_SHARDS = "load", 2  # deploy/serve.yaml names shard-0 and shard-1
BUILD_COMMAND = "recserve default-package"


def artifacts_dir() -> Path:
    return Path(os.environ.get("RECSERVE_ARTIFACTS", ROOT / "artifacts"))


def default_package_dir() -> Path:
    return artifacts_dir() / "default"


def is_built() -> bool:
    return (default_package_dir() / "manifest.json").is_file()


def missing_message() -> str:
    return (f"{default_package_dir()}: the default model package is not built yet; build it with "
            f"`{BUILD_COMMAND}` (trains ~15 s, then exports; `make serve` runs it first)")


def resolve_package(package: str | os.PathLike) -> Path:
    """'default' -> the default package (which must be built; serving never trains: a missing
    one is a PackageError naming the command that makes it); a path -> that path, absolute."""
    if str(package) == "default":
        if not is_built():
            from recserve.package import PackageError

            raise PackageError(missing_message())
        return default_package_dir().resolve()
    return Path(package).expanduser().resolve()


def build_default_package(*, progress: bool = True) -> Path:
    """The default package's directory, training and exporting it first if it is missing."""
    out = default_package_dir()
    if is_built():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".default.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer even if several processes start at once
        if is_built():
            return out
        from recserve.export import export_package
        from recserve.planning import plan_workload
        from recserve.train import train
        from recserve.workloads import load_workload

        workload = load_workload("criteo-kaggle").with_max_rows(MAX_ROWS)
        state = out.parent / "default-state.pt"
        print(f"recserve: training the default model ({workload.name}, tables capped at {MAX_ROWS:,} rows) "
              f"into {out}", flush=True)
        result = train(workload, state, progress=progress)
        print(f"recserve: trained in {result.seconds:.1f}s, held-out AUC {result.auc:.3f} "
              f"(ground truth {result.oracle_auc:.3f}); exporting ...", flush=True)
        plan = plan_workload(workload, strategy=STRATEGY, num_shards=NUM_SHARDS)
        r = export_package(workload, state, out, plan=plan, progress=progress)
        print(f"recserve: {r.summary()}", flush=True)
        state.unlink(missing_ok=True)
    return out
