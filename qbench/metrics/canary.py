"""A machine canary: the same small decode-like workload timed around every
latency measurement, so that a measurement taken while the machine was slow
(other tenants, frequency changes) is seen as such instead of being read as a
backend's speed.

Seen on this project's shared 2-core machines: the same cell decoding 1.4-3x
slower for minutes at a time, and the canary slower with it (32 -> 101 ms).
The workload streams 40 MB of float32 matrices (more than the 32 MB L3 cache)
through matrix-vector products, a parallel region per product, as a decode
step does; it is not proportional to every backend's slowdown (one memory hog
slowed it 1.3-2.2x and a torch decode 3.2x), so it gates and labels
measurements rather than rescaling them.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from qbench.io import write_atomic

#: A latency measurement is retried while the canary runs this much slower
#: than the run's typical value.
SLOW_FACTOR = 1.2
MAX_ATTEMPTS = 3
PAUSE_SECONDS = 10.0


class MachineCanary:
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

    def measure(self, repeats: int = 9) -> float:
        """Median milliseconds of the workload."""
        self._once()  # warm caches and thread pool
        return statistics.median(self._once() for _ in range(repeats))


def typical_ms(history: Path) -> Optional[float]:
    """Median canary time of the run's earlier cells, or None for the first."""
    try:
        values = [entry["ms"] for entry in json.loads(history.read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return statistics.median(values) if values else None


def append_history(history: Path, cell: str, ms: float) -> None:
    try:
        entries = json.loads(history.read_text())
    except (OSError, ValueError):
        entries = []
    entries.append({"cell": cell, "ms": round(ms, 3)})
    write_atomic(history, json.dumps(entries))
