"""GPU utilisation of the serving run, sampled beside the load generator (no torch here).

NVML through ``pynvml`` (the nvidia-ml-py package) where it imports, else ``nvidia-smi``;
no GPU or neither tool: no samples (the table shows "-"). Utilisation is NVML's: the share
of time at least one kernel ran, averaged over all GPUs of the host, in %.
"""

from __future__ import annotations

import shutil
import subprocess
import threading


def _read_nvml():
    import pynvml

    pynvml.nvmlInit()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    if not handles:
        return None
    return lambda: sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles) / len(handles)


def _read_smi():
    if shutil.which("nvidia-smi") is None:
        return None

    def read() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout.split()
        vals = [float(x) for x in out]
        return sum(vals) / len(vals)

    try:
        read()
    except (OSError, ValueError, ZeroDivisionError, subprocess.TimeoutExpired):
        return None
    return read


def gpu_reader():
    """A function returning the current utilisation %, or None where none can be read."""
    try:
        return _read_nvml()
    except Exception:  # no pynvml, or no driver
        return _read_smi()


class GpuSampler:
    """Mean utilisation over a ``with`` block, sampled every ``period_s`` in a thread."""

    def __init__(self, period_s: float = 0.2):
        self.period_s, self.samples = period_s, []
        self._read = gpu_reader()
        self._stop = threading.Event()

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append(self._read())
            except Exception:  # a sample that fails is left out
                continue

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._read is not None:
            self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")
