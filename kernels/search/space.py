"""Candidates as data: a kernel template plus a launch config drawn from that template's
parameter space, and the two ways the search makes a child from a parent (mutate one
parameter to a neighbouring value, or switch template keeping the shared parameters)."""

from __future__ import annotations

import random
from dataclasses import dataclass

# op -> template -> parameter -> allowed values (ordered: neighbours are adjacent)
SPACES: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {
    "embedding_bag": {
        "per_bag": {"BLOCK_N": (1, 2, 4, 8, 16, 32, 64), "BLOCK_D": (16, 32, 64, 128, 256),
                    "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3), "EVICT": (0, 1)},
        "multi_bag": {"BAGS": (2, 4, 8, 16, 32, 64), "BLOCK_N": (1, 2, 4, 8, 16), "BLOCK_D": (16, 32, 64, 128, 256),
                      "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3), "EVICT": (0, 1)},
        "split_bag": {"SPLITS": (2, 4, 8, 16), "BLOCK_N": (1, 2, 4, 8), "BLOCK_D": (16, 32, 64, 128, 256),
                      "num_warps": (1, 2, 4), "num_stages": (1, 2, 3), "EVICT": (0, 1)},
    },
    "interaction": {
        "dot_tile": {"SAMPLES": (1, 2, 4, 8), "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3)},
    },
    "dcn_cross": {
        "cross_gemm": {"BLOCK_M": (32, 64, 128), "BLOCK_N": (32, 64, 128, 256), "BLOCK_K": (32, 64, 128),
                       "GROUP_M": (1, 4, 8), "num_warps": (4, 8), "num_stages": (2, 3, 4, 5)},
    },
}

# hand-picked starting points, one or more per template (the graph's roots)
SEEDS: dict[str, list[tuple[str, dict[str, int]]]] = {
    "embedding_bag": [
        ("per_bag", {"BLOCK_N": 8, "BLOCK_D": 128, "num_warps": 4, "num_stages": 2, "EVICT": 0}),
        ("per_bag", {"BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 1, "num_stages": 1, "EVICT": 1}),
        ("multi_bag", {"BAGS": 8, "BLOCK_N": 1, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1, "EVICT": 0}),
        ("multi_bag", {"BAGS": 4, "BLOCK_N": 4, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1, "EVICT": 1}),
        ("split_bag", {"SPLITS": 4, "BLOCK_N": 2, "BLOCK_D": 128, "num_warps": 1, "num_stages": 1, "EVICT": 1}),
    ],
    "interaction": [
        ("dot_tile", {"SAMPLES": 1, "num_warps": 4, "num_stages": 2}),
        ("dot_tile", {"SAMPLES": 4, "num_warps": 2, "num_stages": 1}),
    ],
    "dcn_cross": [
        ("cross_gemm", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}),
        ("cross_gemm", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}),
    ],
}


@dataclass(frozen=True)
class Candidate:
    template: str
    config: tuple[tuple[str, int], ...]  # sorted (name, value) pairs

    @classmethod
    def make(cls, template: str, config: dict[str, int]) -> "Candidate":
        return cls(template, tuple(sorted(config.items())))

    @property
    def cfg(self) -> dict[str, int]:
        return dict(self.config)

    @property
    def key(self) -> str:
        return self.template + ":" + ",".join(f"{k}={v}" for k, v in self.config)


def seeds(op: str) -> list[Candidate]:
    return [Candidate.make(t, c) for t, c in SEEDS[op]]


def mutate(op: str, parent: Candidate, rng: random.Random) -> Candidate:
    """Move one parameter of the parent one or two steps along its value list."""
    space = SPACES[op][parent.template]
    cfg = parent.cfg
    name = rng.choice(sorted(space))
    values = space[name]
    i = values.index(cfg[name]) if cfg[name] in values else 0
    step = rng.choice((-2, -1, 1, 2))
    cfg[name] = values[min(max(i + step, 0), len(values) - 1)]
    return Candidate.make(parent.template, cfg)


def switch_template(op: str, parent: Candidate, rng: random.Random) -> Candidate:
    """The same config under another template; parameters it lacks come from its seed."""
    others = [t for t in SPACES[op] if t != parent.template]
    if not others:
        return mutate(op, parent, rng)
    template = rng.choice(others)
    base = next(c for t, c in SEEDS[op] if t == template)
    cfg = {k: parent.cfg.get(k, v) for k, v in base.items()}
    cfg = {k: (v if v in SPACES[op][template][k] else base[k]) for k, v in cfg.items()}
    return Candidate.make(template, cfg)


def prior_seeds(winners, op: str, dtype: str) -> list[Candidate]:
    """The distinct Triton configs that ``winners`` (a :class:`~kernels.registry.Winners`,
    e.g. another GPU's of the same compute capability) holds for ``op`` and ``dtype``, each
    completed from its template's seed to a point of the search space: extra roots."""
    found: list[Candidate] = []
    for key in sorted(winners.entries):
        entry = winners.entries[key]
        template = entry.get("template")
        if not key.startswith(f"{op}/{dtype}/") or entry.get("backend") != "triton" or template not in SPACES[op]:
            continue
        base = next(c for t, c in SEEDS[op] if t == template)
        space = SPACES[op][template]
        cfg = {k: (int(entry["config"][k]) if int(entry["config"].get(k, -1)) in space[k] else v)
               for k, v in base.items()}
        cand = Candidate.make(template, cfg)
        if cand not in found:
            found.append(cand)
    return found
