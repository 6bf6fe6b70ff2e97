"""Winners: the per-device table of searched kernel configs, and its lookup.

The search (kernels/search) writes ``kernels/winners/<device-slug>.json``; serving only
reads it, once, when a replica is built. Keys are ``"<op>/<dtype>/<bucket>"``, where a
bucket is a few shape figures rounded to powers of two, e.g. ``"d128_p8_b512"``
(max dim 128, about 8 ids per bag, batch 512). An entry either names a Triton template and
its launch config, or says ``"backend": "reference"`` where nothing beat the reference.

Which file a GPU reads (:func:`select_winners_file`): its own (the slug of its name), else
a file of another GPU of the same compute capability (an H200 reads the H100's winners
until it has its own), else none. Each process prints the choice once per device, so a
replica's log says which file it uses. ``RECSERVE_KERNEL_WINNERS`` names a file instead.

Lookup: the call's exact bucket, else the nearest searched bucket of the same op and dtype
at most :data:`MAX_BUCKET_DISTANCE` away (sum of |log2| distances over the bucket's figures:
one power of two in one figure), a "reference" entry winning ties; anything farther, or no
entry at all, runs the reference. So a Triton config runs only at or next to a shape where
the search measured it beating the reference.

File layout::

    {"device": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "capability": [9, 0],
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
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

WINNERS_DIR = Path(__file__).resolve().parent / "winners"
MAX_BUCKET_DISTANCE = 1.0  # nearest-bucket lookup reaches one power of two in one figure


def pow2_bucket(x: float) -> int:
    """Round a positive figure to the nearest power of two (1 for anything <= 1)."""
    if x <= 1:
        return 1
    return 1 << round(math.log2(x))


def slugify(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the winners file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def device_slug(device: torch.device | str | None = None) -> str:
    """The slug of a CUDA device's name (torch.cuda.get_device_name); 'cpu' for CPU devices."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return "cpu"
    return slugify(torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class WinnersSource:
    """Which winners file a device reads, and why (the replica's log line says both)."""

    path: Path | None  # None: no file, every op runs the reference under "auto"
    reason: str


def select_winners_file(device_name: str, capability: tuple[int, int],
                        directory: Path = WINNERS_DIR) -> WinnersSource:
    """The device's own file, else the first (by name) file whose ``capability`` is the
    device's, else none. Pure: takes the name and compute capability as arguments."""
    own = Path(directory) / f"{slugify(device_name)}.json"
    sm = f"sm_{capability[0]}{capability[1]}"
    if own.exists():
        return WinnersSource(own, f"its own winners ({sm})")
    for path in capability_files(capability, directory):
        device = Winners.load(path).meta.get("device", path.stem)
        return WinnersSource(path, f"no file of its own; {device} has the same compute capability {sm}")
    return WinnersSource(None, f"no winners for it or for {sm}: 'auto' runs the torch reference")


def capability_files(capability: tuple[int, int], directory: Path = WINNERS_DIR) -> list[Path]:
    """The winners files (by name) of every GPU with this compute capability."""
    return [path for path in sorted(Path(directory).glob("*.json"))
            if tuple(Winners.load(path).meta.get("capability") or ()) == tuple(capability)]


_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(device: torch.device, name: str, source: WinnersSource) -> None:
    """Print the device's winners file once per process (a replica's log shows it)."""
    key = (str(device), str(source.path))
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(f"kernels: {device} ({name}) uses winners {source.path or '-'}: {source.reason}",
              file=sys.stderr, flush=True)


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

    def __init__(self, entries: dict[str, dict[str, Any]] | None = None, *, meta: dict | None = None,
                 source: WinnersSource | None = None):
        self.entries: dict[str, dict[str, Any]] = dict(entries or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self.source = source or WinnersSource(None, "built in memory")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Winners":
        path = Path(path)
        if not path.exists():
            return cls(source=WinnersSource(None, f"{path} does not exist"))
        data = json.loads(path.read_text())
        entries = data.get("entries", {})
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: 'entries' must be an object")
        return cls(entries, meta={k: v for k, v in data.items() if k != "entries"},
                   source=WinnersSource(path, "loaded"))

    @classmethod
    def for_device(cls, device: torch.device | str, directory: Path | None = None) -> "Winners":
        """The winners this device runs with (empty on CPU): see :func:`select_winners_file`."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls(source=WinnersSource(None, "CPU: the reference runs"))
        name = torch.cuda.get_device_name(device)
        override = os.environ.get("RECSERVE_KERNEL_WINNERS")
        if override:
            source = WinnersSource(Path(override), "named by RECSERVE_KERNEL_WINNERS")
        else:
            source = select_winners_file(name, torch.cuda.get_device_capability(device), directory or WINNERS_DIR)
        _announce(device, name, source)
        winners = cls.load(source.path) if source.path else cls()
        return cls(winners.entries, meta=winners.meta, source=source)

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
            near = sorted((_distance(want, _parse_bucket(k[len(prefix):])), self.entries[k].get("backend") == "triton", k)
                          for k in self.entries if k.startswith(prefix))
            if not near or near[0][0] > MAX_BUCKET_DISTANCE:
                return REFERENCE
            key = near[0][2]  # the nearest; at equal distance a "reference" entry first
            entry = self.entries[key]
        if entry.get("backend") != "triton":
            return Choice(backend="reference", key=key)
        return Choice(
            backend="triton",
            template=entry["template"],
            config={k: int(v) for k, v in entry["config"].items()},
            key=key,
        )
