"""A time estimate before a run starts, from earlier runs of the same cells
(same model fingerprint, suite hash and device) found in the results folder."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from qbench.results import ResultStore


def past_durations(results_root: Path, model_fingerprint: str, suite_hash: str, device: str) -> dict[str, float]:
    """Latest wall seconds of each cell that finished in an earlier run,
    less the quantize time (artifacts are cached after the first run), plus
    its latency trials' workers."""
    found: dict[str, tuple[float, float]] = {}
    for path in results_root.glob("*/results.jsonl"):
        for r in ResultStore(path.parent).latest().values():
            if (r.get("status") != "ok" or r.get("suite", {}).get("hash") != suite_hash
                    or r.get("model", {}).get("fingerprint") != model_fingerprint or r.get("device") != device):
                continue
            quantize = r.get("phase_seconds", {}).get("quantize", 0.0) if not r["artifact"]["cache_hit"] else 0.0
            seconds = r.get("wall_seconds", 0.0) - quantize + sum(r.get("trial_wall_seconds", []))
            if r["cell"] not in found or r.get("finished", 0) > found[r["cell"]][1]:
                found[r["cell"]] = (seconds, r.get("finished", 0))
    return {cell: seconds for cell, (seconds, _) in found.items()}


def estimate(cells: list[str], history: dict[str, float]) -> tuple[Optional[float], int]:
    """(estimated seconds or None, number of cells without history; those
    count as the median known cell)."""
    known = [history[c] for c in cells if c in history]
    if not known:
        return None, len(cells)
    unknown = len(cells) - len(known)
    return sum(known) + unknown * statistics.median(known), unknown
