"""Decisions over measured rows, made in one place for every view.

- **Within a budget** is decided at the error bar, by the metric registry's
  ``judge`` (qbench.metrics.registry), which `qbench search` asks too.
- **The front** is over every axis a user trades: quality (mean KLD to the
  baseline), weight memory, decode time per token at batch 1, and decode
  throughput at the largest batch of the sweep. A row is dominated when
  another is at least as good on every axis and better on one.
- **The answers** are the questions users ask, each within the quality
  budget: the smallest, the fastest at batch 1, the highest throughput at
  the largest batch. On CUDA an eager row whose compiled twin was measured is
  marked launch-bound: its time is Python launching kernels, not the weights.
  With a context sweep (long context), also the smallest total memory
  (weights plus one sequence's KV cache) at the longest context, judged on
  the KLD measured at that length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from qbench.core.records import CellRecord
from qbench.metrics.registry import Z, judge

MIB = 2**20


@dataclass(frozen=True)
class Axis:
    name: str
    label: str
    higher_is_better: bool
    read: Callable[[CellRecord], Optional[float]]


def quality(record: CellRecord) -> Optional[float]:
    """The quality axis: mean KLD to the baseline (0 for the baseline)."""
    return 0.0 if record.baseline else record.value("kld")


def quality_stderr(record: CellRecord) -> float:
    return 0.0 if record.baseline else record.stderr("kld") or 0.0


QUALITY = Axis("kld", "mean KLD", False, quality)
WEIGHTS = Axis("weight_bytes", "weight memory", False, lambda r: r.value("weight_bytes") or None)
KV = Axis("kv_bytes_per_token", "KV cache bytes per position", False, lambda r: r.value("kv_bytes_per_token"))
DECODE = Axis("decode_ms_per_token", "decode time at batch 1", False, lambda r: r.value("decode_ms_per_token"))


def context_figure(record: CellRecord, length: int, name: str) -> tuple[Optional[float], float]:
    """(value, standard error) of ``name`` at context ``length`` of the
    record's context sweep; a baseline's KLD is 0 at every length its
    perplexity was scored at."""
    figures = record.context_sweep.get(length, {})
    if name == "kld" and record.baseline:
        return (0.0, 0.0) if "perplexity" in figures else (None, 0.0)
    metric = figures.get(name)
    return (metric.value, metric.stderr or 0.0) if metric is not None else (None, 0.0)


def longest_context(records: list[CellRecord]) -> Optional[int]:
    """The longest context length at which every row has its total memory
    and its KLD (None without a context sweep)."""
    lengths = (
        [
            length
            for length in set().union(*(set(r.context_sweep) for r in records))
            if all(context_figure(r, length, "total_bytes")[0] is not None for r in records)
            and all(context_figure(r, length, "kld")[0] is not None for r in records)
        ]
        if records
        else []
    )
    return max(lengths) if lengths else None


def total_axis(length: int) -> Axis:
    return Axis(
        f"total_bytes@{length}",
        f"weights + KV at {length} tokens",
        False,
        lambda r: context_figure(r, length, "total_bytes")[0],
    )


def quality_axis(length: int) -> Axis:
    return Axis(f"kld@{length}", f"mean KLD at {length} tokens", False, lambda r: context_figure(r, length, "kld")[0])


def throughput_axis(batch: int) -> Axis:
    def read(record: CellRecord) -> Optional[float]:
        figures = record.latency_sweep.get(batch)
        metric = figures.get("decode_tokens_per_s") if figures else None
        return metric.value if metric is not None else None

    return Axis(f"tokens_per_s@{batch}", f"throughput at batch {batch}", True, read)


def axes_for(records: list[CellRecord]) -> list[Axis]:
    """The axes every row of ``records`` has a figure on: quality and
    weights always; the KV cache's bytes per position when a row quantizes
    its cache (else a row with a smaller cache is only ever a worse twin of
    its full-cache row); decode time and the largest batch's throughput when
    every row was timed (a row without a figure can neither win nor lose)."""
    axes = [QUALITY, WEIGHTS]
    if any((r.config or {}).get("kv_cache", "full") != "full" for r in records) and all(
        KV.read(r) is not None for r in records
    ):
        axes.append(KV)
    if records and all(DECODE.read(r) is not None for r in records):
        axes.append(DECODE)
    common = set.intersection(*(set(r.latency_sweep) for r in records)) if records else set()
    if len(common) > 1:
        axes.append(throughput_axis(max(common)))
    return axes


def dominates(a: CellRecord, b: CellRecord, axes: list[Axis]) -> bool:
    better = False
    for axis in axes:
        x, y = axis.read(a), axis.read(b)
        if axis.higher_is_better:
            x, y = -x, -y
        if x > y:
            return False
        better = better or x < y
    return better


def pareto(records: list[CellRecord], axes: list[Axis]) -> tuple[list[CellRecord], dict[str, CellRecord]]:
    """(the rows no other row dominates, ordered by weight memory;
    each dominated row's cell -> the smallest row that dominates it)."""
    rows = [r for r in records if all(axis.read(r) is not None for axis in axes)]
    front, dominated = [], {}
    for r in rows:
        by = [o for o in rows if o is not r and dominates(o, r, axes)]
        if by:
            dominated[r.cell] = min(by, key=WEIGHTS.read)
        else:
            front.append(r)
    return sorted(front, key=WEIGHTS.read), dominated


def compiled_twins(records: list[CellRecord]) -> dict[str, CellRecord]:
    """Eager rows on CUDA whose same variant was also measured compiled:
    eager cell -> the compiled row."""

    def identity(record: CellRecord) -> tuple:
        settings = {k: v for k, v in (record.config or {}).items() if k not in ("runtime", "compile_mode")}
        return record.backend, repr(sorted(settings.items()))

    compiled = {identity(r): r for r in records if (r.config or {}).get("runtime") == "compiled"}
    return {
        r.cell: compiled[identity(r)]
        for r in records
        if r.device == "cuda" and (r.config or {}).get("runtime", "eager") == "eager" and identity(r) in compiled
    }


def _figures(record: CellRecord, base: Optional[CellRecord]) -> str:
    weights = record.value("weight_bytes")
    parts = [
        f"{weights / MIB:.1f} MiB"
        + (
            f" ({100 * weights / base.value('weight_bytes'):.0f}% of the baseline's)"
            if base is not None and base.value("weight_bytes") and record is not base
            else ""
        )
    ]
    kld, se = quality(record), quality_stderr(record)
    if not record.baseline and kld is not None:
        parts.append(f"KLD {kld:.4f}" + (f" ± {Z * se:.4f} (95%)" if se else ""))
    decode = record.value("decode_ms_per_token")
    if decode is not None:
        base_decode = base.value("decode_ms_per_token") if base is not None else None
        parts.append(
            f"{decode:.2f} ms/token"
            + (f" ({base_decode / decode:.2f}x the baseline's speed)" if base_decode and record is not base else "")
        )
    return ", ".join(parts)


def _speed_ties(fastest: CellRecord, rows: list[CellRecord]) -> str:
    """What the "fastest" answer cannot tell apart: rows whose decode time is
    within the 95% error bar of the difference to the fastest's, or, without
    an error bar (one worker process per row), that no difference is judged."""
    se_best = fastest.stderr("decode_ms_per_token")
    if se_best is None:
        return "; timed in one worker process, without an error bar: a small lead is not judged"
    best = DECODE.read(fastest) or 0.0
    ties = [
        f"`{r.cell}` ({DECODE.read(r):.2f} ms/token)"
        for r in rows
        if r is not fastest
        and (se := r.stderr("decode_ms_per_token")) is not None
        and (DECODE.read(r) or 0.0) - best <= Z * math.hypot(se, se_best)
    ]
    return f"; as fast within the error bar: {', '.join(ties)}" if ties else ""


def recommend(records: list[CellRecord], kld_budget: float) -> list[str]:
    """The recommendation's lines (markdown with `code` spans)."""
    ok = [r for r in records if r.ok]
    base = next((r for r in ok if r.baseline), None)
    if base is None:
        return [
            "The baseline has no result in this run, so no variant could be measured against it: rerun it "
            "with `qbench run --resume RUN --retry-failed`."
        ]
    measured = [r for r in ok if quality(r) is not None and WEIGHTS.read(r) is not None]
    axes = axes_for(measured)
    front, dominated = pareto(measured, axes)
    lines = [f"Pareto-optimal on {', '.join(a.label for a in axes)}: " + ", ".join(f"`{r.cell}`" for r in front) + "."]
    budget = f"mean KLD ≤ {kld_budget:g} at its 95% upper bound"
    within = [r for r in measured if judge("kld", quality(r), quality_stderr(r), kld_budget)]
    if not [r for r in within if not r.baseline]:
        lines.append(
            f"No variant stays within the quality budget ({budget}): keep the baseline, or loosen the "
            "budget with --kld-budget."
        )
    else:
        # ties (one weight file, two runtimes) go to the better, then the faster row
        smallest = min(within, key=lambda r: (WEIGHTS.read(r), quality(r), DECODE.read(r) or float("inf")))
        lines.append(f"Smallest within the quality budget ({budget}): `{smallest.cell}`: {_figures(smallest, base)}.")
        timed = [r for r in within if DECODE.read(r) is not None]
        if timed:
            fastest = min(timed, key=DECODE.read)
            lines.append(
                f"Fastest at batch 1 within the budget: `{fastest.cell}`: {_figures(fastest, base)}"
                + _speed_ties(fastest, timed)
                + "."
            )
        throughput = next((a for a in axes if a.name.startswith("tokens_per_s@")), None)
        if throughput is not None:
            best = max(within, key=throughput.read)
            lines.append(
                f"Highest {throughput.label} within the budget: `{best.cell}`: {throughput.read(best):.1f} tokens/s."
            )
    if dominated:
        lines.append(
            "Dominated (another row is as good on every axis and better on one): "
            + ", ".join(f"`{cell}` by `{by.cell}`" for cell, by in dominated.items())
            + "."
        )
    lines += context_answer(measured, kld_budget)
    for eager, compiled in compiled_twins(ok).items():
        row = next(r for r in ok if r.cell == eager)
        if DECODE.read(row) is not None and DECODE.read(compiled) is not None:
            lines.append(
                f"`{eager}` is launch-bound: it decodes at {DECODE.read(row):.2f} ms/token eager, its "
                f"compiled twin `{compiled.cell}` at {DECODE.read(compiled):.2f}; the eager time is Python "
                "launching kernels, not the weights."
            )
    return lines


def context_answer(records: list[CellRecord], kld_budget: float) -> list[str]:
    """ "Smallest total memory at context N within the budget", N the longest
    context every row was measured at, the budget judged on the KLD at N."""
    length = longest_context(records)
    if length is None:
        return []
    total = total_axis(length)
    within = [r for r in records if judge("kld", *context_figure(r, length, "kld"), kld_budget)]
    budget = f"mean KLD at {length} tokens ≤ {kld_budget:g} at its 95% upper bound"
    if not [r for r in within if not r.baseline]:
        return [f"At {length} tokens of context no variant stays within the quality budget ({budget})."]
    best = min(within, key=lambda r: (total.read(r), context_figure(r, length, "kld")[0]))
    kv = context_figure(best, length, "kv_bytes")[0]
    kld, se = context_figure(best, length, "kld")
    return [
        f"Smallest total memory at {length} tokens of context (weights + one sequence's KV cache) within "
        f"the budget ({budget}): `{best.cell}`: {total.read(best) / MIB:.1f} MiB"
        + (f" ({best.value('weight_bytes') / MIB:.1f} weights + {kv / MIB:.1f} KV)" if kv is not None else "")
        + (f", KLD at {length} tokens {kld:.4f} ± {Z * se:.4f}" if not best.baseline else "")
        + "."
    ]
