"""Which package ``default`` names when serving: ``artifacts/default``, built by
``recserve default-package`` (see :mod:`recserve.default_package`). Serving never trains:
a missing default package is a PackageError that names the command that makes it."""

from __future__ import annotations

import os
from pathlib import Path

from recserve.default_package import artifacts_dir, default_package_dir, is_built, missing_message
from recserve.package import PackageError

__all__ = ["artifacts_dir", "default_package_dir", "resolve_package"]


def resolve_package(package: str | os.PathLike) -> Path:
    """'default' -> the default package (which must be built); a path -> that path, absolute."""
    if str(package) == "default":
        if not is_built():
            raise PackageError(missing_message())
        return default_package_dir().resolve()
    return Path(package).expanduser().resolve()
