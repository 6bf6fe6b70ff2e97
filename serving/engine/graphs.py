"""CUDA graphs of one replica's GPU step, one per bucket, captured at replica start.

A step is a function of no arguments that reads static device input buffers (sliced to the
bucket's shape) and returns its output tensor. Capture runs it once eagerly on a side stream
(Triton compiles, cuBLAS picks its kernels), then records it; the request path only
replays. Nothing is captured or compiled on the request path.

All graphs of a set share one memory pool. That is safe here because a replica replays one
graph at a time and reads its output before the next replay (the cores hold a lock around
stage -> replay -> copy out): a later graph may reuse an earlier graph's freed
intermediates, and an output is only valid until the next replay of any graph of the set.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch


class GraphSet:
    """Captured steps keyed by bucket, on one CUDA device."""

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, key: Hashable, step: Callable[[], torch.Tensor]) -> None:
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # warm-up: compiles and allocates outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = step()
            torch.cuda.current_stream().synchronize()
        self._graphs[key] = (graph, out)

    def replay(self, key: Hashable) -> torch.Tensor:
        """Runs the step captured for ``key``; its output tensor (valid until the next replay)."""
        graph, out = self._graphs[key]
        graph.replay()
        return out
