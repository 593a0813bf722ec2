"""A machine canary: the same small workload timed around every latency
measurement, so that a measurement taken while the machine was slow (other
tenants, frequency changes) is seen as such instead of being read as a
backend's speed. It measures the resource the row's speed depends on: on the
CPU a decode-like matrix-vector workload (``MachineCanary``); on CUDA the
GPU's memory bandwidth, timed with CUDA events, and for eager rows the host's
kernel launches (``DeviceCanary``): a CPU workload on a GPU machine once
labelled every row of an idle H100 "busy".

Seen on this project's shared 2-core machines: the same cell decoding 1.4-3x
slower for minutes at a time, and the canary slower with it (32 -> 101 ms).
The workload streams 40 MB of float32 matrices through matrix-vector
products, a parallel region per product, as a decode step does; it is not
proportional to every backend's slowdown (one memory hog slowed it 1.3-2.2x
and a torch decode 3.2x), so it gates and labels measurements rather than
rescaling them.

A reading is the lower quartile of 15 repetitions: on an idle 2-core VM the
median of 9 wandered by +-11 % between readings (2.29-2.85 ms), the lower
quartile by +-7 %, while a busy machine slows every repetition. A cell's
figure in the run's history is the median of all its readings, and a
measurement counts as slow only when the readings before and after it both
are (see ``qbench.cell.worker.gated_latency``): comparing the larger of two
readings with the smallest of earlier ones once labelled idle rows "42 %
slower".
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from qbench.core.io import write_atomic

#: A latency measurement is retried while the canary runs this much slower
#: than the run's typical value.
SLOW_FACTOR = 1.2
MAX_ATTEMPTS = 3
PAUSE_SECONDS = 10.0


class MachineCanary:
    """The CPU canary. ``read()`` gives ``{"ms": ...}``."""

    resources = {"ms": "the CPU (a decode-like matrix-vector workload)"}

    def __init__(self, matrices: int = 12, rows: int = 1536, cols: int = 576):
        generator = torch.Generator().manual_seed(0)
        self.weights = [torch.randn(rows, cols, generator=generator) for _ in range(matrices)]
        self.vector = torch.randn(cols, generator=generator)

    def _once(self) -> float:
        start = time.perf_counter()
        for _ in range(2):
            for weight in self.weights:
                torch.mv(weight, self.vector)
        return (time.perf_counter() - start) * 1e3

    def measure(self, repeats: int = 15) -> float:
        """Milliseconds of the workload: the lower quartile of ``repeats``."""
        self._once()  # warm caches and thread pool
        return lower_quartile([self._once() for _ in range(repeats)])

    def read(self, eager: bool = True) -> dict[str, float]:
        return {"ms": self.measure()}


class DeviceCanary:
    """The CUDA canary: ``ms``, a 64 MiB device-to-device copy repeated 4
    times and timed with CUDA events (the GPU's memory bandwidth, which a
    decode step streams its weights through and another tenant would share);
    ``launch_ms``, the host's wall time to launch 256 tiny kernels and wait
    for them (what an eager decode step waits on), read for eager rows only.
    Seen on an idle H100: 0.194 ms for the copies (2.8 TB/s) in every
    reading; 64 launches took 0.42-0.45 ms, noisy enough to cost the first
    cell a retry, hence 256."""

    resources = {
        "ms": "the GPU's memory bandwidth (a device copy timed with CUDA events)",
        "launch_ms": "the host's kernel launches",
    }

    def __init__(self, mib: int = 64):
        self.source = torch.empty(mib * 2**20 // 4, device="cuda")
        self.target = torch.empty_like(self.source)
        self.small = torch.zeros(16, device="cuda")

    def _device_ms(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(4):
            self.target.copy_(self.source)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def _launch_ms(self) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(256):
            self.small.add_(1.0)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    def read(self, eager: bool = True, repeats: int = 15) -> dict[str, float]:
        self._device_ms(), self._launch_ms()  # warm up: clocks, the allocator, the launch path
        out = {"ms": lower_quartile([self._device_ms() for _ in range(repeats)])}
        if eager:
            out["launch_ms"] = lower_quartile([self._launch_ms() for _ in range(repeats)])
        return out


def lower_quartile(samples: list[float]) -> float:
    """The first quartile: steadier than the median under an idle machine's
    jitter, and still raised when the machine is busy for the whole reading."""
    return statistics.quantiles(samples, n=4, method="inclusive")[0] if len(samples) > 1 else samples[0]


def make_canary(device: str):
    return DeviceCanary() if device == "cuda" else MachineCanary()


def slowdown(reading: dict[str, float], typical: dict[str, float]) -> tuple[float, str]:
    """The largest ratio of a reading to its typical value, and its key."""
    ratios = {key: value / typical[key] for key, value in reading.items() if typical.get(key)}
    if not ratios:
        return 1.0, "ms"
    key = max(ratios, key=ratios.get)
    return ratios[key], key


def typical(history: Path) -> dict[str, float]:
    """Median of each canary figure over the run's earlier cells (empty for
    the first cell); each cell's own figure is the median of its readings."""
    try:
        entries = [e for e in json.loads(history.read_text()) if isinstance(e, dict)]
    except (OSError, ValueError, TypeError, RecursionError):
        return {}
    keys = {k for e in entries for k, v in e.items() if k != "cell" and isinstance(v, (int, float))}
    return {k: statistics.median(e[k] for e in entries if isinstance(e.get(k), (int, float))) for k in keys}


def typical_ms(history: Path) -> Optional[float]:
    """Median canary time of the run's earlier cells, or None for the first."""
    return typical(history).get("ms")


def cell_figure(readings: list[dict[str, float]]) -> dict[str, float]:
    """A cell's canary figure for the run's history: per key, the median of
    every reading the cell took (its start, and before and after each attempt)."""
    keys = {key for reading in readings for key in reading}
    return {key: statistics.median(r[key] for r in readings if key in r) for key in keys}


def append_history(history: Path, cell: str, reading: dict[str, float] | float) -> None:
    try:
        entries = json.loads(history.read_text())
    except (OSError, ValueError, RecursionError):
        entries = []
    if not isinstance(entries, list):
        entries = []
    if not isinstance(reading, dict):
        reading = {"ms": reading}
    entries.append({"cell": cell, **{k: round(v, 4) for k, v in reading.items()}})
    write_atomic(history, json.dumps(entries))
