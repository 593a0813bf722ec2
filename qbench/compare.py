"""The same cells across two runs (a new library version, another machine):
which figures changed beyond their error bars.

Quality metrics carry standard errors: a change is flagged when it exceeds
``Z`` combined standard errors. Latency is judged from its repetitions: the
standard error of the median of the per-repetition medians, 1.2533 σ/√n (its
large-sample value for a normal distribution; the tokens of one repetition
are not independent samples), with a floor: changes under 10% are not
flagged, as run-to-run variation on one machine exceeds the within-run error.
A latency measured while the machine canary said the machine was slower than
usual for its run (other tenants, frequency changes) is not judged at all:
it is listed as such.

Within-run error bars miss what changes between runs: each process places
its weights anew, and the same artifact decodes 10-40% faster or slower from
one process to the next on this project's shared 2-core machines (measured:
torchao int4 at 46.6-81.9 ms/token over five runs, 56-72 ms over four fresh
processes in a row). So the run-to-run noise is measured from the two runs
themselves: the robust spread (1.4826 x median absolute deviation) of the
log-ratios of every latency figure they share, when there are at least
``MIN_SPREAD_FIGURES``. A latency change is flagged only beyond ``Z`` times
that spread as well. A change common to every cell (another machine, a slower
library everywhere) shows as the median ratio, reported beside.

Memory has no noise model: a change of more than 5% is flagged.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

Z = 2.0
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


def _noise(name: str, metrics: dict[str, Any]) -> Optional[float]:
    if name in LATENCY:
        reps = _repetitions(name, metrics)
        return 1.2533 * statistics.stdev(reps) / math.sqrt(len(reps)) if len(reps) >= 2 else None
    return metrics[name].get("stderr")


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


def compare_records(a: dict[str, dict], b: dict[str, dict]) -> tuple[list[str], list[list[str]], int]:
    """(headers, rows, number of flagged changes) over the cells that finished
    in both runs."""
    headers = ["cell", "metric", "run A", "run B", "change", "beyond noise?"]
    rows, flagged = [], 0
    spread = latency_spread(a, b)
    for cell in _shared(a, b):
        ma, mb = a[cell]["metrics"], b[cell]["metrics"]
        for name in QUALITY + LATENCY + MEMORY:
            if not isinstance(ma.get(name), dict) or not isinstance(mb.get(name), dict):
                continue
            va, vb = ma[name]["value"], mb[name]["value"]
            if va is None or vb is None:
                continue
            diff = vb - va
            if name in MEMORY:
                beyond = abs(diff) > MEMORY_TOLERANCE * abs(va)
                verdict = "YES" if beyond else f"no (within {MEMORY_TOLERANCE:.0%})"
            elif name in LATENCY and (_machine_busy(ma) or _machine_busy(mb)):
                which = "A" if _machine_busy(ma) else "B"
                beyond = False
                verdict = f"not judged ({_machine_busy(ma if which == 'A' else mb)} in run {which})"
            else:
                sa, sb = _noise(name, ma), _noise(name, mb)
                if sa is None or sb is None:
                    continue
                bar = Z * math.hypot(sa, sb)
                if name in LATENCY:
                    between = Z * spread[0] if spread else 0.0
                    bar = max(bar, max(LATENCY_FLOOR, between) * abs(va))
                beyond = abs(diff) > bar and diff != 0
                verdict = "YES" if beyond else f"no (|Δ| ≤ {bar:.4g})"
            flagged += beyond
            rows.append([cell, name, f"{va:.6g}", f"{vb:.6g}", f"{diff:+.4g}", verdict])
    return headers, rows, flagged


def unmatched(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    only_a = [f"{c} (only in run A)" for c in a if c not in b]
    only_b = [f"{c} (only in run B)" for c in b if c not in a]
    failed = [f"{c} (failed in at least one run)" for c in a
              if c in b and (a[c]["status"] != "ok" or b[c]["status"] != "ok")]
    return only_a + only_b + failed
