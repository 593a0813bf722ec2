"""The comparison table as people read it: formatted cells, deltas with
error bars, failures with their reason."""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

from qbench.core.errors import QBenchError
from qbench.core.records import CellRecord, Metric
from qbench.metrics.registry import METRICS, info


def _value(record: CellRecord, name: str) -> Optional[Metric]:
    m = record.metrics.get(name)
    return m if m is not None and m.value is not None else None


def _num(m: Optional[Metric], fmt: str, scale: float = 1.0, err: bool = False) -> str:
    if m is None:
        return "-"
    text = format(m.value * scale, fmt)
    if err and m.stderr is not None:
        text += " ± " + format(m.stderr * scale, fmt)
    return text


#: The columns shown unless ``--metrics`` says otherwise (lm-eval tasks' main figures join them).
DEFAULT_METRICS = (
    "weight_bytes",
    "peak_rss_bytes",
    "perplexity",
    "ln_ppl_ratio",
    "kld",
    "same_top_p",
    "acc",
    "gen_exact_match",
    "prefill_ms",
    "decode_ms_per_token",
    "decode_tokens_per_s",
    "roofline_fraction",
)
#: An lm-eval task's main figure, the first of these it reports.
LM_EVAL_MAIN = ("acc_norm", "acc", "exact_match", "word_perplexity")


class Column(NamedTuple):
    """One column: a record metric (``kld``), or a task's (``TASK/METRIC``,
    as lm-eval names them: ``lm_eval:arc_easy/acc_norm``), shown as its
    engine reports it."""

    header: str
    metric: str
    task: Optional[str] = None
    fmt: str = ".4f"
    scale: float = 1.0
    err: bool = True
    asked: bool = False  # named by the user: shown even when no record has it

    def value(self, record: CellRecord) -> Optional[Metric]:
        if self.task is None:
            return _value(record, self.metric)
        m = (record.tasks.get(self.task) or {}).get(self.metric)
        return m if m is not None and m.value is not None else None

    def text(self, record: CellRecord) -> str:
        return _num(self.value(record), self.fmt, self.scale, self.err)


def column(name: str, asked: bool = False) -> Column:
    task, _, metric = name.rpartition("/")
    if task:
        return Column(f"{task} {metric}", metric, task, asked=asked)
    m = info(name)
    return Column(m.label, name, None, m.fmt, m.scale, m.show_stderr, asked)


def lm_eval_columns(records: list[CellRecord]) -> list[str]:
    """Each lm-eval task's main figure, in the order the records hold them."""
    out: list[str] = []
    for r in records:
        for task, figures in r.tasks.items():
            main = next((m for m in LM_EVAL_MAIN if m in figures), next(iter(figures), None))
            if task.startswith("lm_eval:") and main and f"{task}/{main}" not in out:
                out.append(f"{task}/{main}")
    return out


def available_metrics(records: list[CellRecord]) -> list[str]:
    names = dict.fromkeys(n for r in records for n in r.metrics)
    names.update(dict.fromkeys(f"{task}/{m}" for r in records for task, figures in r.tasks.items() for m in figures))
    return list(names)


def select_columns(records: list[CellRecord], metrics: Optional[str] = None) -> list[Column]:
    """The table's columns. ``metrics``: comma-separated names (a record's
    metric, or ``TASK/METRIC``) that replace the default columns, or, each
    with a leading ``+``, join them: ``+word_perplexity,+bits_per_byte``."""
    names, asked = list(DEFAULT_METRICS) + lm_eval_columns(records), []
    if any((r.config or {}).get("kv_cache", "full") != "full" for r in records):
        # a run that quantizes a cache shows what a position of it costs
        names.insert(names.index("weight_bytes") + 1, "kv_bytes_per_token")
    if metrics:
        asked = [m.strip() for m in metrics.split(",") if m.strip()]
        if not asked:
            raise QBenchError("--metrics is empty: name metrics, e.g. --metrics kld,word_perplexity")
        known = available_metrics(records)
        unknown = [m.lstrip("+") for m in asked if m.lstrip("+") not in known and m.lstrip("+") not in METRICS]
        if unknown:
            raise QBenchError(f"--metrics: no metric {', '.join(unknown)} in this run; it has: {', '.join(known)}")
        added = [m[1:] for m in asked if m.startswith("+")]
        if added and len(added) != len(asked):
            raise QBenchError(
                "--metrics: either every name has a leading + (added to the default columns) or "
                "none has (the columns to show)"
            )
        asked = [m.lstrip("+") for m in asked]
        names = names + [m for m in added if m not in names] if added else list(dict.fromkeys(asked))
    return [column(n, n in asked) for n in names]


def table_rows(records: list[CellRecord], metrics: Optional[str] = None) -> tuple[list[str], list[list[str]]]:
    columns = select_columns(records, metrics)
    headers = ["variant", "status"] + [c.header for c in columns]
    rows = []
    for r in records:
        label = r.cell + (" (baseline)" if r.baseline else "")
        if not r.ok and not r.completed_phases:
            rows.append([label, "FAILED: " + (r.error or "?")] + ["-"] * len(columns))
            continue
        status = "ok"
        if not r.ok:  # the figures of the phases it finished, with what failed after them
            status = f"FAILED in {r.phase} (kept: {', '.join(r.completed_phases)}): {r.error or '?'}"
        rows.append([label, status] + [c.text(r) for c in columns])
    # Drop default columns that no record has a value for (e.g. a suite
    # without tasks); a column asked for by name stays, empty or not.
    keep = [i for i in range(len(headers)) if i < 2 or columns[i - 2].asked or any(row[i] != "-" for row in rows)]
    return [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]


#: What starts raw HTML in CommonMark: '<' before a tag name, '/', '!' or '?'
_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")


def md_text(text: str) -> str:
    """Text for markdown that is published: HTML in it (a suite or task
    named ``<script>``) is escaped, so a renderer shows it instead of running
    it; ``kld<=0.05`` starts no tag and stays as written. Code spans
    (between backticks) render literally and are kept; an unclosed
    backtick's tail is escaped like text."""
    parts = str(text).split("`")
    closed = len(parts) if len(parts) % 2 else len(parts) - 1  # the parts before an unclosed backtick
    return "`".join(p if i % 2 and i < closed else _HTML_START.sub("&lt;", p) for i, p in enumerate(parts))


def markdown_rows(headers: list[str], rows: list[list[str]]) -> list[str]:
    def cell(value) -> str:
        return md_text(str(value)).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def markdown_table(records: list[CellRecord], metrics: Optional[str] = None) -> str:
    headers, rows = table_rows(records, metrics)
    lines = markdown_rows(headers, rows)
    notes = [f"- {md_text(r.cell)}: {md_text(note)}" for r in records for note in r.notes]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines)
