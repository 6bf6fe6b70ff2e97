"""The interfaces of the search, named (as torchrec names its planner's stage interfaces in
its ``types.py``): what a problem gives the search loop, and the timer it is driven by."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

from kernels.search.space import Candidate

# ``timer(fn, label) -> seconds``: a CudaTimer on a GPU, a fake in CPU tests; label is
# "reference" or the candidate's key
LabelledTimer = Callable[[Callable[[], object], str], float]


@runtime_checkable
class SearchProblem(Protocol):
    """One operator at one (dtype, shape bucket), with its reference.

    Implemented by EmbeddingBagProblem, DotProblem and CrossProblem (kernels/search/problems.py).
    Inputs are opaque to the search: whatever ``gate_inputs``/``timing_inputs`` return is
    handed back to ``run`` and ``reference``."""

    @property
    def op(self) -> str: ...  # "embedding_bag" | "interaction" | "dcn_cross" (the winners key's op)

    @property
    def dtype(self) -> str: ...

    @property
    def bucket(self) -> str: ...  # e.g. "d128_p8_b512" (kernels/registry.py)

    @property
    def tolerance(self) -> float: ...  # largest error() a candidate may have against the reference

    def normalize(self, cand: Candidate) -> Candidate:
        """The candidate as it would run on this problem (e.g. BLOCK_D capped to the dims)."""

    def gate_inputs(self, seed: int) -> Any:
        """Small seeded inputs of the bucket's shape, awkward ones included (ragged, empty)."""

    def timing_inputs(self) -> Any:
        """Full-size inputs on which candidate and reference are timed."""

    def run(self, cand: Candidate, inputs: Any, poison: bool = True) -> torch.Tensor:
        """The candidate's output (compiles on first use); ``poison`` fills the output with NaN
        first so an element the kernel never writes fails the gate."""

    def reference(self, inputs: Any) -> torch.Tensor:
        """The torch reference's output."""

    def error(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        """How far ``out`` is from ``ref`` (compared with ``tolerance``)."""
