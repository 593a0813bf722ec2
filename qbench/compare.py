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
it is listed as such. Memory has no noise model: a change of more than 5% is
flagged.
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


def compare_records(a: dict[str, dict], b: dict[str, dict]) -> tuple[list[str], list[list[str]], int]:
    """(headers, rows, number of flagged changes) over the cells that finished
    in both runs."""
    headers = ["cell", "metric", "run A", "run B", "change", "beyond noise?"]
    rows, flagged = [], 0
    for cell in [c for c in a if c in b and a[c]["status"] == "ok" and b[c]["status"] == "ok"]:
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
                    bar = max(bar, LATENCY_FLOOR * abs(va))
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
