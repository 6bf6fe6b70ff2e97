"""The search graph on disk: every candidate tried for one (op, dtype, shape bucket), its
parent, how it was made, and its result. Written atomically after every evaluation, so an
interrupted search resumes where it stopped and never repeats a candidate.

    {"op": "embedding_bag", "dtype": "fp16", "bucket": "d128_p8_b512", "device": "...",
     "reference_seconds": 2.9e-4, "rounds": 12, "rounds_since_gain": 3,
     "nodes": [{"id": 0, "parent": null, "made_by": "seed", "template": "per_bag",
                "config": {...}, "status": "ok", "seconds": 8.1e-5, "fitness": 3.6,
                "flagged": false, "error": null}, ...]}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kernels.search.space import Candidate

FLAG_SPEEDUP = 10.0  # a fitness above this is flagged for a second look


@dataclass
class Node:
    id: int
    parent: int | None
    made_by: str  # "seed" | "mutate" | "switch"
    template: str
    config: dict[str, int]
    status: str = "pending"  # "ok" | "gate_failed" | "compile_error" | "pending"
    seconds: float | None = None
    fitness: float = 0.0  # reference time / candidate time; 0 when it failed
    flagged: bool = False
    error: str | None = None

    @property
    def candidate(self) -> Candidate:
        return Candidate.make(self.template, self.config)


@dataclass
class SearchGraph:
    op: str
    dtype: str
    bucket: str
    device: str = ""
    reference_seconds: float | None = None
    rounds: int = 0
    rounds_since_gain: int = 0
    nodes: list[Node] = field(default_factory=list)
    path: Path | None = None

    @classmethod
    def open(cls, path: Path, *, op: str, dtype: str, bucket: str, device: str = "") -> "SearchGraph":
        """Resume the graph at ``path`` if it exists (same op/dtype/bucket), else a new one."""
        path = Path(path)
        if path.exists():
            data = json.loads(path.read_text())
            if (data["op"], data["dtype"], data["bucket"]) != (op, dtype, bucket):
                raise ValueError(f"{path}: holds {data['op']}/{data['dtype']}/{data['bucket']}, "
                                 f"not {op}/{dtype}/{bucket}")
            nodes = [Node(**n) for n in data.pop("nodes")]
            return cls(**data, nodes=nodes, path=path)
        return cls(op=op, dtype=dtype, bucket=bucket, device=device, path=path)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("nodes", "path")}
        data["nodes"] = [asdict(n) for n in self.nodes]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)

    def has(self, cand: Candidate) -> bool:
        return any(n.candidate == cand for n in self.nodes)

    def add(self, cand: Candidate, *, parent: int | None, made_by: str) -> Node:
        node = Node(id=len(self.nodes), parent=parent, made_by=made_by, template=cand.template,
                    config=cand.cfg)
        self.nodes.append(node)
        return node

    def evaluated(self) -> list[Node]:
        return [n for n in self.nodes if n.status != "pending"]

    def best(self) -> Node | None:
        ok = [n for n in self.nodes if n.status == "ok" and n.fitness > 0]
        return max(ok, key=lambda n: (n.fitness, -n.id)) if ok else None
