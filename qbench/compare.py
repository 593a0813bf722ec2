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

Runs with a single trial per cell (older runs, suites with ``trials: 1``)
have no between-process error: the within-process error of the repetitions
is widened by the run-to-run spread measured across the two runs' cells (the
robust SD, 1.4826 x MAD, of the log-ratios of every latency figure they
share, when there are at least ``MIN_SPREAD_FIGURES``).

Memory has no noise model: a change of more than 5% is flagged.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from qbench.metrics.trials import log_spread

ALPHA = 0.05
QUALITY = ("perplexity", "kld", "same_top_p", "ln_ppl_ratio", "acc", "acc_norm")
LATENCY = ("prefill_ms", "decode_ms_per_token")
MEMORY = ("weight_bytes",)
MEMORY_TOLERANCE = 0.05
LATENCY_FLOOR = 0.10
MIN_SPREAD_FIGURES = 8


def _repetitions(name: str, metrics: dict[str, Any]) -> list[float]:
    """One value per repetition of the latency workload: prefill samples
    already are; decode samples are split into repetitions of new_tokens - 1
    gaps, each summarised by its median."""
    samples = metrics[name].get("samples") or []
    if name != "decode_ms_per_token":
        return samples
    gaps = (metrics.get("latency_workload") or {}).get("new_tokens", 0) - 1
    if gaps < 1:
        return samples
    return [statistics.median(samples[i: i + gaps]) for i in range(0, len(samples), gaps)]


def _trials(name: str, metrics: dict[str, Any]) -> list[float]:
    return metrics[name].get("trials") or []


def pooled_trial_spread(records: dict[str, dict], name: str) -> Optional[float]:
    """SD of log trial medians within cells, pooled over a run's cells
    (each weighted by its degrees of freedom), or None without two trials
    anywhere."""
    sum_sq, dof = 0.0, 0
    for record in records.values():
        metrics = record.get("metrics") or {}
        if record.get("status") != "ok" or not isinstance(metrics.get(name), dict) or _machine_busy(metrics):
            continue
        trials = _trials(name, metrics)
        if len(trials) >= 2:
            sum_sq += (len(trials) - 1) * log_spread(trials) ** 2
            dof += len(trials) - 1
    return math.sqrt(sum_sq / dof) if dof else None


def _latency_log_error(name: str, metrics: dict[str, Any], pooled: Optional[float]) -> tuple[Optional[float], bool]:
    """(standard error of log(value), whether it covers process-to-process
    variation)."""
    trials = _trials(name, metrics)
    if len(trials) >= 2:
        return max(log_spread(trials), pooled or 0.0) / math.sqrt(len(trials)), True
    reps = _repetitions(name, metrics)
    if len(reps) < 2:
        return None, False
    return 1.2533 * statistics.stdev(reps) / math.sqrt(len(reps)) / metrics[name]["value"], False


def _machine_busy(metrics: dict[str, Any]) -> Optional[str]:
    canary = metrics.get("machine_canary_ms")
    if isinstance(canary, dict) and canary.get("busy"):
        return f"machine {canary['value'] / canary['typical'] - 1:.0%} slower than usual"
    return None


def _shared(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    return [c for c in a if c in b and a[c]["status"] == "ok" and b[c]["status"] == "ok"]


def latency_spread(a: dict[str, dict], b: dict[str, dict]) -> Optional[tuple[float, float, int]]:
    """(robust SD of the log-ratios B/A of the latency figures both runs
    measured on a quiet machine, their median, how many), or None when too
    few figures to tell."""
    ratios = []
    for cell in _shared(a, b):
        ma, mb = a[cell]["metrics"], b[cell]["metrics"]
        if _machine_busy(ma) or _machine_busy(mb):
            continue
        for name in LATENCY:
            va, vb = (ma.get(name) or {}).get("value"), (mb.get(name) or {}).get("value")
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


def _z_score(name: str, ma: dict[str, Any], mb: dict[str, Any], pooled: dict[str, tuple],
             spread: Optional[tuple]) -> Optional[float]:
    """Change over its combined standard error; None without an error."""
    va, vb = ma[name]["value"], mb[name]["value"]
    if name in LATENCY:
        if va <= 0 or vb <= 0:
            return None
        (sa, trials_a), (sb, trials_b) = (_latency_log_error(name, ma, pooled[name][0]),
                                          _latency_log_error(name, mb, pooled[name][1]))
        if sa is None or sb is None:
            return None
        error = math.hypot(sa, sb)
        if not (trials_a and trials_b) and spread:
            error = max(error, spread[0])  # no between-process error in a run: the cross-cell spread stands in
        change = math.log(vb / va)
    else:
        sa, sb = ma[name].get("stderr"), mb[name].get("stderr")
        if sa is None or sb is None:
            return None
        error, change = math.hypot(sa, sb), vb - va
    if change == 0:
        return 0.0
    return change / error if error > 0 else math.copysign(math.inf, change)


def compare_records(a: dict[str, dict], b: dict[str, dict]) -> tuple[list[str], list[list[str]], int]:
    """(headers, rows, number of flagged changes) over the cells that finished
    in both runs."""
    headers = ["cell", "metric", "run A", "run B", "change", "z", "beyond noise?"]
    spread = latency_spread(a, b)
    pooled = {name: (pooled_trial_spread(a, name), pooled_trial_spread(b, name)) for name in LATENCY}
    rows: list[list[str]] = []
    tests: list[tuple[int, float, bool]] = []  # (row, p-value, large enough to matter)
    for cell in _shared(a, b):
        ma, mb = a[cell]["metrics"], b[cell]["metrics"]
        for name in QUALITY + LATENCY + MEMORY:
            if not isinstance(ma.get(name), dict) or not isinstance(mb.get(name), dict):
                continue
            va, vb = ma[name]["value"], mb[name]["value"]
            if va is None or vb is None:
                continue
            row = [cell, name, f"{va:.6g}", f"{vb:.6g}", f"{vb - va:+.4g}", "", ""]
            if name in MEMORY:
                beyond = abs(vb - va) > MEMORY_TOLERANCE * abs(va)
                row[-1] = "YES" if beyond else f"no (within {MEMORY_TOLERANCE:.0%})"
            elif name in LATENCY and (_machine_busy(ma) or _machine_busy(mb)):
                which, busy = ("A", _machine_busy(ma)) if _machine_busy(ma) else ("B", _machine_busy(mb))
                row[-1] = f"not judged ({busy} in run {which})"
            else:
                z = _z_score(name, ma, mb, pooled, spread)
                if z is None:
                    continue
                row[5] = f"{z:+.1f}"
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


def unmatched(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    only_a = [f"{c} (only in run A)" for c in a if c not in b]
    only_b = [f"{c} (only in run B)" for c in b if c not in a]
    failed = [f"{c} (failed in at least one run)" for c in a
              if c in b and (a[c]["status"] != "ok" or b[c]["status"] != "ok")]
    return only_a + only_b + failed
