"""Latency over several independent processes ("trials"), and its error bar.

Repetitions inside one process agree within a few percent, but the same
artifact decodes at different speeds from one process to the next: weights
and temporaries land at other addresses, the allocator's state differs, and
some kernels' speed is bimodal across processes while stable inside one
(docs/methodology.md gives the figures). An error bar from one process
cannot see that; pyperf spawns many worker
processes for the same reason. So the latency workload runs in ``trials``
separate worker processes (the cell's own, then one more per trial after
every cell has run), and each figure is the geometric mean of the trials'
medians, with the standard error of that mean in log space. Trials taken
while the machine canary said the machine was busy are left out when a
quiet one exists.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from qbench.core.records import CellRecord
from qbench.metrics import metric, roofline
from qbench.metrics.cost import quantile

#: Latency figures summarised per trial by their median.
DISTRIBUTIONS = ("prefill_ms", "decode_ms_per_token", "generate_ms")


def _busy(trial: dict[str, Any]) -> bool:
    return bool((trial.get("machine_canary_ms") or {}).get("busy"))


def log_spread(values: list[float]) -> Optional[float]:
    """Sample standard deviation of the logs (relative spread), or None for
    fewer than two values."""
    if len(values) < 2:
        return None
    return statistics.stdev(math.log(v) for v in values)


def _used(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials the figures come from: the quiet ones, when there are any."""
    return [t for t in trials if not _busy(t)] or trials


def trial_workload(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The latency workload as measured over the trials used."""
    used = _used(trials)
    return {
        **used[0]["latency_workload"],
        "repetitions": sum(t["latency_workload"]["repetitions"] for t in used),
        "trials": len(used),
        "trials_left_out_busy": len(trials) - len(used),
    }


def combine_trials(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's latency figures from the raw output of each trial
    (``latency_metrics`` plus ``machine_canary_ms``)."""
    used = _used(trials)
    out: dict[str, Any] = {}
    for name in DISTRIBUTIONS:
        per_trial = [t[name]["value"] for t in used]
        samples = [s for t in used for s in t[name]["samples"]]
        centre = math.exp(statistics.fmean(math.log(v) for v in per_trial))
        spread = log_spread(per_trial)
        stderr = centre * spread / math.sqrt(len(per_trial)) if spread is not None else None
        out[name] = metric(
            centre,
            used[0][name]["unit"],
            len(samples),
            stderr,
            trials=[round(v, 4) for v in per_trial],
            p90=quantile(samples, 0.9),
            p99=quantile(samples, 0.99),
            mean=statistics.fmean(samples),
            samples=samples,
        )
    decode = out["decode_ms_per_token"]
    batch = used[0]["latency_workload"]["batch_size"]
    tps = batch * 1e3 / decode["value"]
    out["decode_tokens_per_s"] = metric(
        tps, "tokens/s", decode["n"], tps * decode["stderr"] / decode["value"] if decode.get("stderr") else None
    )
    # The canary of the trials used: busy only when every trial was.
    out["machine_canary_ms"] = max(used, key=lambda t: t["machine_canary_ms"]["value"])["machine_canary_ms"]
    return out


#: Every note about a busy machine starts so: they are rewritten when a
#: trial is added.
BUSY_NOTE = "latency measured while the machine was busy"


def busy_notes(latency: dict[str, Any]) -> list[str]:
    """A note when the combined latency comes from busy trials only."""
    canary = latency["machine_canary_ms"]
    if not canary.get("busy"):
        return []
    ratio = canary.get("ratio") or canary["value"] / canary["typical"]
    resource = canary.get("resource") or "the machine"
    return [
        f"{BUSY_NOTE}: the canary of {resource} ran {ratio - 1:.0%} slower than usual for this run in every "
        f"latency trial, after retries; its latency figures are unreliable"
    ]


def add_trial(record: CellRecord, trial: dict[str, Any]) -> CellRecord:
    """A copy of a cell's record with one more latency trial combined in."""
    trials = record.latency_trials + [trial]
    latency = combine_trials(trials)
    metrics = {**{k: m.model_dump() for k, m in record.metrics.items()}, **latency}
    metrics.update(roofline.refresh(metrics))
    notes = [n for n in record.notes if not n.startswith(BUSY_NOTE)] + busy_notes(latency)
    return record.updated(metrics=metrics, notes=notes, latency_trials=trials, latency_workload=trial_workload(trials))


def trials_attempted(record: CellRecord) -> int:
    """Trials measured or tried (a failed trial is not tried again)."""
    if not record.latency_trials:
        return 0
    return len(record.latency_trials) + len(record.latency_trial_errors)
