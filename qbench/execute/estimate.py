"""A time estimate before a run starts, and the expected time of each worker
for the progress display, from earlier runs of the same cells (same model
fingerprint, suite hash and device) found in the results folder. Building
an artifact (quantizing) is counted where the cache lacks it: its time comes
from any earlier run of that cell on the same model and device."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Optional

from qbench.core.errors import QBenchError
from qbench.execute.results import ResultStore


class Cost(NamedTuple):
    """What one cell took when it last finished here."""

    measure: float  # its worker with the artifact already built
    trials: list[float]  # each of its later latency trials' workers
    build: Optional[float]  # building its artifact (from any suite), None if never built here
    key: Optional[str]  # the artifact's cache key


def past_costs(
    results_root: Path,
    model_fingerprint: str,
    suite_hash: str,
    device: str,
    warn: Callable[[str], None] = lambda message: None,
) -> dict[str, Cost]:
    """Each cell's latest finished record of this model, suite and device.
    An unreadable run is skipped with a warning: one damaged folder must
    not stop every new run."""
    latest: dict[str, tuple[float, Cost]] = {}
    builds: dict[str, float] = {}
    for path in sorted(results_root.glob("*/results.jsonl")):
        try:
            records = ResultStore(path.parent).latest().values()
        except QBenchError as exc:
            warn(f"time estimate leaves out {path.parent.name}: {exc}")
            continue
        for r in records:
            if not r.ok or r.model.fingerprint != model_fingerprint or r.device != device:
                continue
            built = r.value("quantize_seconds")  # the artifact's own build time, even when it was cached
            if built is not None:
                builds[r.cell] = built
            if r.suite.hash != suite_hash:
                continue
            cached = r.artifact is not None and r.artifact.cache_hit
            measure = (r.wall_seconds or 0.0) - (0.0 if cached else r.phase_seconds.get("quantize", 0.0))
            cost = Cost(measure, list(r.trial_wall_seconds), None, r.artifact.key if r.artifact else None)
            if r.cell not in latest or (r.finished or 0) > latest[r.cell][0]:
                latest[r.cell] = (r.finished or 0, cost)
    return {cell: cost._replace(build=builds.get(cell)) for cell, (_, cost) in latest.items()}


class Estimate(NamedTuple):
    #: expected seconds of each worker, by the progress display's label
    #: (a cell: its name; a latency trial: "CELL · latency trial k of K")
    workers: dict[str, float]
    #: cells whose artifact must be built first, and the seconds counted for it
    builds: dict[str, float]
    #: cells never finished here with this suite: counted as the median known cell
    unknown: list[str]

    @property
    def seconds(self) -> float:
        return sum(self.workers.values())


def estimate(
    cells: list[tuple[str, str]], costs: dict[str, Cost], trials: int, cached: Callable[[str, str], bool]
) -> Optional[Estimate]:
    """The expected time of ``cells`` ((cell, backend) pairs to run), each
    with ``trials - 1`` latency trials after it; ``cached(backend, key)``
    says whether an artifact is in the cache. None without any history."""
    known = [costs[c] for c, _ in cells if c in costs]
    if not known:
        return None
    typical = statistics.median(c.measure for c in known)
    typical_trial = statistics.median([t for c in known for t in c.trials] or [0.0])
    workers: dict[str, float] = {}
    builds: dict[str, float] = {}
    unknown: list[str] = []
    for cell, backend in cells:
        cost = costs.get(cell)
        if cost is None:
            unknown.append(cell)
            workers[cell] = typical
        else:
            workers[cell] = cost.measure
            if cost.build and not (cost.key and cached(backend, cost.key)):
                builds[cell] = cost.build
                workers[cell] += cost.build
        for k in range(2, trials + 1):
            past = cost.trials[k - 2] if cost is not None and len(cost.trials) >= k - 1 else typical_trial
            workers[f"{cell} · latency trial {k} of {trials}"] = past
    return Estimate(workers, builds, unknown)
