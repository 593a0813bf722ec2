"""The same cells across two runs (a new library version, another machine):
which figures changed beyond their error bars.

Every judged figure gets a z-score, its change over the combined standard
error of the two runs, and a two-sided p-value. A comparison judges dozens of
figures at once (over a hundred for the default suite), so a per-figure
threshold of 5% would flag a few of them in two identical runs by chance
alone: changes are flagged by Holm's step-down procedure, which keeps the
chance of flagging anything at all in two runs without a real change under
``ALPHA`` (family-wise), whatever the figures' correlation.

Quality metrics carry standard errors from their samples. Latency is judged
in log space (a ratio) from its trials, the medians of independent worker
processes (qbench.metrics.trials): the standard error of their log-mean,
with the spread of each run's trials pooled over its cells as a floor (two
or three trials estimate one cell's spread poorly). Changes under
``LATENCY_FLOOR`` are not flagged: differences that small are not what a
choice between quantizations turns on, and a machine drifts by that much
over an hour. A latency measured while the machine canary said the machine
was slower than usual for its run is not judged at all, and is listed so.

A latency measured in a single worker process (older runs, suites with
``trials: 1`` such as smoke) has no between-process error, and the speed of
one artifact differs more between processes than between repetitions: it is
shown with the z of its repetitions but not judged, and the exit code does
not count it. ``latency_spread`` (the robust SD of the log-ratios of every
latency figure two runs share) describes how far the machine moved between
them; it judges nothing.

Memory has no noise model: a change of more than 5% is flagged.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from qbench.core.records import CellRecord
from qbench.metrics.registry import compared
from qbench.metrics.trials import log_spread

ALPHA = 0.05
QUALITY, LATENCY, MEMORY = compared("quality"), compared("latency"), compared("memory")
MEMORY_TOLERANCE = 0.05
LATENCY_FLOOR = 0.10
MIN_SPREAD_FIGURES = 8  # latency_spread: fewer figures tell nothing


def _repetitions(name: str, record: CellRecord) -> list[float]:
    """One value per repetition of the latency workload: prefill samples
    already are; decode samples are split into repetitions of new_tokens - 1
    gaps, each summarised by its median."""
    samples = record.metrics[name].get("samples") or []
    if name != "decode_ms_per_token":
        return samples
    gaps = (record.latency_workload or {}).get("new_tokens", 0) - 1
    if gaps < 1:
        return samples
    return [statistics.median(samples[i : i + gaps]) for i in range(0, len(samples), gaps)]


def _trials(name: str, record: CellRecord) -> list[float]:
    return record.metrics[name].get("trials") or []


def pooled_trial_spread(records: dict[str, CellRecord], name: str) -> Optional[float]:
    """SD of log trial medians within cells, pooled over a run's cells
    (each weighted by its degrees of freedom), or None without two trials
    anywhere."""
    sum_sq, dof = 0.0, 0
    for record in records.values():
        if not record.ok or name not in record.metrics or _machine_busy(record):
            continue
        trials = _trials(name, record)
        if len(trials) >= 2:
            sum_sq += (len(trials) - 1) * log_spread(trials) ** 2
            dof += len(trials) - 1
    return math.sqrt(sum_sq / dof) if dof else None


def _latency_log_error(name: str, record: CellRecord, pooled: Optional[float]) -> Optional[float]:
    """Standard error of log(value): from the between-process trials where
    there are two or more, else from the repetitions of one process."""
    trials = _trials(name, record)
    if len(trials) >= 2:
        return max(log_spread(trials), pooled or 0.0) / math.sqrt(len(trials))
    reps = _repetitions(name, record)
    if len(reps) < 2:
        return None
    return 1.2533 * statistics.stdev(reps) / math.sqrt(len(reps)) / record.metrics[name].value


def _machine_busy(record: CellRecord) -> Optional[str]:
    canary = record.metrics.get("machine_canary_ms")
    if canary is not None and canary.get("busy") and canary.get("typical"):
        return f"machine {(canary.get('ratio') or canary.value / canary.get('typical')) - 1:.0%} slower than usual"
    return None


def _shared(a: dict[str, CellRecord], b: dict[str, CellRecord]) -> list[str]:
    return [c for c in a if c in b and a[c].ok and b[c].ok]


def latency_spread(a: dict[str, CellRecord], b: dict[str, CellRecord]) -> Optional[tuple[float, float, int]]:
    """(robust SD of the log-ratios B/A of the latency figures both runs
    measured on a quiet machine, their median, how many), or None when too
    few figures to tell."""
    ratios = []
    for cell in _shared(a, b):
        if _machine_busy(a[cell]) or _machine_busy(b[cell]):
            continue
        for name in LATENCY:
            va, vb = a[cell].value(name), b[cell].value(name)
            if va and vb and va > 0 and vb > 0:
                ratios.append(math.log(vb / va))
    if len(ratios) < MIN_SPREAD_FIGURES:
        return None
    center = statistics.median(ratios)
    return 1.4826 * statistics.median(abs(r - center) for r in ratios), center, len(ratios)


def p_value(z: float) -> float:
    """Two-sided normal p-value."""
    return math.erfc(abs(z) / math.sqrt(2))


def holm(p_values: list[float], alpha: float = ALPHA) -> list[bool]:
    """Which hypotheses Holm's step-down procedure rejects at family-wise
    error ``alpha``."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def _z_score(name: str, ra: CellRecord, rb: CellRecord, pooled: dict[str, tuple]) -> Optional[float]:
    """Change over its combined standard error; None without an error."""
    va, vb = ra.value(name), rb.value(name)
    if name in LATENCY:
        if va <= 0 or vb <= 0:
            return None
        sa, sb = _latency_log_error(name, ra, pooled[name][0]), _latency_log_error(name, rb, pooled[name][1])
        if sa is None or sb is None:
            return None
        error, change = math.hypot(sa, sb), math.log(vb / va)
    else:
        sa, sb = ra.stderr(name), rb.stderr(name)
        if sa is None or sb is None:
            return None
        error, change = math.hypot(sa, sb), vb - va
    if change == 0:
        return 0.0
    return change / error if error > 0 else math.copysign(math.inf, change)


def compare_records(a: dict[str, CellRecord], b: dict[str, CellRecord]) -> tuple[list[str], list[list[str]], int]:
    """(headers, rows, number of flagged changes) over the cells that finished
    in both runs."""
    headers = ["cell", "metric", "run A", "run B", "change", "z", "beyond noise?"]
    pooled = {name: (pooled_trial_spread(a, name), pooled_trial_spread(b, name)) for name in LATENCY}
    rows: list[list[str]] = []
    tests: list[tuple[int, float, bool]] = []  # (row, p-value, large enough to matter)
    for cell in _shared(a, b):
        ra, rb = a[cell], b[cell]
        for name in QUALITY + LATENCY + MEMORY:
            va, vb = ra.value(name), rb.value(name)
            if va is None or vb is None:
                continue
            row = [cell, name, f"{va:.6g}", f"{vb:.6g}", f"{vb - va:+.4g}", "", ""]
            if name in MEMORY:
                beyond = abs(vb - va) > MEMORY_TOLERANCE * abs(va)
                row[-1] = "YES" if beyond else f"no (within {MEMORY_TOLERANCE:.0%})"
            elif name in LATENCY and (_machine_busy(ra) or _machine_busy(rb)):
                which, busy = ("A", _machine_busy(ra)) if _machine_busy(ra) else ("B", _machine_busy(rb))
                row[-1] = f"not judged ({busy} in run {which})"
            else:
                z = _z_score(name, ra, rb, pooled)
                if z is None:
                    continue
                row[5] = f"{z:+.1f}"
                single = [w for w, r in (("A", ra), ("B", rb)) if len(_trials(name, r)) < 2]
                if name in LATENCY and single:
                    row[-1] = (
                        f"not judged (one worker process in run {' and '.join(single)}: speed differs "
                        "between processes; latency trials >= 2 give it an error bar)"
                    )
                    rows.append(row)
                    continue
                matters = name not in LATENCY or abs(vb / va - 1) >= LATENCY_FLOOR
                tests.append((len(rows), p_value(z), matters))
            rows.append(row)
    rejected = holm([p for _, p, _ in tests])
    for (index, p, matters), reject in zip(tests, rejected):
        if reject and matters:
            rows[index][-1] = "YES"
        elif reject:
            rows[index][-1] = f"no (p={p:.2g}, under the {LATENCY_FLOOR:.0%} floor)"
        else:
            rows[index][-1] = f"no (p={p:.2g})"
    flagged = sum(row[-1] == "YES" for row in rows)
    return headers, rows, flagged


def unmatched(a: dict[str, CellRecord], b: dict[str, CellRecord]) -> list[str]:
    only_a = [f"{c} (only in run A)" for c in a if c not in b]
    only_b = [f"{c} (only in run B)" for c in b if c not in a]
    failed = [f"{c} (failed in at least one run)" for c in a if c in b and not (a[c].ok and b[c].ok)]
    return only_a + only_b + failed
