"""GPU timing shared by the search and the benchmark: CUDA events, warm-up, L2 flushed
between trials, median of the trials. A timer is a plain function ``timer(fn) -> seconds``
so the search can be driven by a fake one in CPU tests."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

Timer = Callable[[Callable[[], object]], float]


class CudaTimer:
    """Median seconds of ``fn()`` over ``reps`` trials, each after an L2 flush."""

    def __init__(self, *, warmup: int = 5, reps: int = 25, flush_bytes: int = 256 << 20,
                 device: torch.device | str = "cuda") -> None:
        self.warmup = warmup
        self.reps = reps
        self.device = torch.device(device)
        # larger than the L2 (50 MB on H100), read between trials to evict the inputs. A read,
        # not a write: written lines would stay dirty in L2 and their write-back would land
        # inside the next timed trial, charging it DRAM traffic that is not its own.
        self._flush = torch.ones(flush_bytes // 4, dtype=torch.int32, device=self.device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize(self.device)
        times = []
        for _ in range(self.reps):
            self._flush.sum()  # a read of every line; the scalar result is dropped
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        return statistics.median(times)


def copy_bandwidth(timer: CudaTimer, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=timer.device).uniform_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * nbytes / seconds  # src and dst are freed on return
