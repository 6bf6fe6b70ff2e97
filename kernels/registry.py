"""Winners: the per-device table of searched kernel configs, and its lookup.

The search (kernels/search) writes ``kernels/winners/<device-slug>.json``; serving only
reads it, once, when a replica is built. Keys are ``"<op>/<dtype>/<bucket>"``, where a
bucket is a few shape figures rounded to powers of two, e.g. ``"d128_p8_b512"``
(max dim 128, about 8 ids per bag, batch 512). An entry either names a Triton template and
its launch config, or says ``"backend": "reference"`` where nothing beat the reference.

Lookup is exact first, then the nearest bucket of the same op and dtype (sum of |log2|
distances over the bucket's figures); no entry at all means "use the reference".

File layout::

    {"device": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3",
     "entries": {"embedding_bag/fp16/d128_p8_b512":
                   {"backend": "triton", "template": "multi_bag",
                    "config": {"BAGS": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 2},
                    "speedup": 6.1, "ref_us": 410.0, "kernel_us": 67.0}}}
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

WINNERS_DIR = Path(__file__).resolve().parent / "winners"


def pow2_bucket(x: float) -> int:
    """Round a positive figure to the nearest power of two (1 for anything <= 1)."""
    if x <= 1:
        return 1
    return 1 << round(math.log2(x))


def device_slug(device: torch.device | str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' for CPU devices."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_key(op: str, dtype: str, bucket: str) -> str:
    return f"{op}/{dtype}/{bucket}"


def _parse_bucket(bucket: str) -> dict[str, int]:
    out = {}
    for part in bucket.split("_"):
        m = re.fullmatch(r"([a-z]+)(\d+)", part)
        if not m:
            return {}
        out[m.group(1)] = int(m.group(2))
    return out


def _distance(a: dict[str, int], b: dict[str, int]) -> float:
    if set(a) != set(b):
        return math.inf
    return sum(abs(math.log2(max(a[k], 1)) - math.log2(max(b[k], 1))) for k in a)


@dataclass(frozen=True)
class Choice:
    """What to run for one (op, dtype, bucket): a Triton template + config, or the reference."""

    backend: str  # "triton" | "reference"
    template: str | None = None
    config: dict[str, int] = field(default_factory=dict)
    key: str | None = None  # the winners key it came from (None: no entry)


REFERENCE = Choice(backend="reference")


class Winners:
    """An in-memory winners table. Read once per replica; lookups are dict work only."""

    def __init__(self, entries: dict[str, dict[str, Any]] | None = None, *, meta: dict | None = None):
        self.entries: dict[str, dict[str, Any]] = dict(entries or {})
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Winners":
        path = Path(path)
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        entries = data.get("entries", {})
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: 'entries' must be an object")
        return cls(entries, meta={k: v for k, v in data.items() if k != "entries"})

    @classmethod
    def for_device(cls, device: torch.device | str, directory: Path | None = None) -> "Winners":
        """The committed winners of this device (empty on CPU or for an unknown GPU)."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls()
        override = os.environ.get("RECSERVE_KERNEL_WINNERS")
        if override:
            return cls.load(override)
        return cls.load((directory or WINNERS_DIR) / f"{device_slug(device)}.json")

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write (temp file + rename), keys sorted so diffs stay readable."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = dict(self.meta)
        data["entries"] = {k: self.entries[k] for k in sorted(self.entries)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)

    def lookup(self, op: str, dtype: str, bucket: str) -> Choice:
        key = make_key(op, dtype, bucket)
        entry = self.entries.get(key)
        if entry is None:
            want = _parse_bucket(bucket)
            prefix = f"{op}/{dtype}/"
            best, best_d = None, math.inf
            for k in sorted(self.entries):
                if k.startswith(prefix):
                    d = _distance(want, _parse_bucket(k[len(prefix):]))
                    if d < best_d:
                        best, best_d = k, d
            if best is None:
                return REFERENCE
            key, entry = best, self.entries[best]
        if entry.get("backend") != "triton":
            return Choice(backend="reference", key=key)
        return Choice(
            backend="triton",
            template=entry["template"],
            config={k: int(v) for k, v in entry["config"].items()},
            key=key,
        )
