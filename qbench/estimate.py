"""A time estimate before a run starts, from earlier runs of the same cells
(same model fingerprint, suite hash and device) found in the results folder."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Optional

from qbench.errors import QBenchError
from qbench.results import ResultStore


def past_durations(results_root: Path, model_fingerprint: str, suite_hash: str, device: str,
                   warn: Callable[[str], None] = lambda message: None) -> dict[str, float]:
    """Latest wall seconds of each cell that finished in an earlier run,
    less the quantize time (artifacts are cached after the first run), plus
    its latency trials' workers. An unreadable run is skipped with a warning:
    one damaged folder must not stop every new run."""
    found: dict[str, tuple[float, float]] = {}
    for path in sorted(results_root.glob("*/results.jsonl")):
        try:
            records = ResultStore(path.parent).latest().values()
        except QBenchError as exc:
            warn(f"time estimate leaves out {path.parent.name}: {exc}")
            continue
        for r in records:
            if (not r.ok or r.suite.hash != suite_hash or r.model.fingerprint != model_fingerprint
                    or r.device != device):
                continue
            cached = r.artifact is not None and r.artifact.cache_hit
            quantize = 0.0 if cached else r.phase_seconds.get("quantize", 0.0)
            seconds = (r.wall_seconds or 0.0) - quantize + sum(r.trial_wall_seconds)
            if r.cell not in found or (r.finished or 0) > found[r.cell][1]:
                found[r.cell] = (seconds, r.finished or 0)
    return {cell: seconds for cell, (seconds, _) in found.items()}


def estimate(cells: list[str], history: dict[str, float]) -> tuple[Optional[float], int]:
    """(estimated seconds or None, number of cells without history; those
    count as the median known cell)."""
    known = [history[c] for c in cells if c in history]
    if not known:
        return None, len(cells)
    unknown = len(cells) - len(known)
    return sum(known) + unknown * statistics.median(known), unknown
