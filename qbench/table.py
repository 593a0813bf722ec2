"""The comparison table as people read it: formatted cells, deltas with
error bars, failures with their reason."""

from __future__ import annotations

import re
from typing import Optional

from qbench.records import CellRecord, Metric

MIB = 2 ** 20


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


#: (header, metric, format, scale, show stderr)
COLUMNS = (
    ("weights MiB", "weight_bytes", ".1f", 1 / MIB, False),
    ("peak RSS MiB", "peak_rss_bytes", ".0f", 1 / MIB, False),
    ("PPL", "perplexity", ".3f", 1.0, True),
    ("ln(PPL/base)", "ln_ppl_ratio", ".4f", 1.0, True),
    ("KLD", "kld", ".5f", 1.0, True),
    ("same top %", "same_top_p", ".2f", 100.0, True),
    ("acc %", "acc", ".1f", 100.0, True),
    ("gen exact %", "gen_exact_match", ".0f", 100.0, False),
    ("prefill ms", "prefill_ms", ".1f", 1.0, True),
    ("decode ms/tok", "decode_ms_per_token", ".2f", 1.0, True),
    ("tok/s", "decode_tokens_per_s", ".1f", 1.0, False),
    ("BW % of peak", "roofline_fraction", ".1f", 100.0, False),
)


def table_rows(records: list[CellRecord]) -> tuple[list[str], list[list[str]]]:
    headers = ["variant", "status"] + [c[0] for c in COLUMNS]
    rows = []
    for r in records:
        label = r.cell + (" (baseline)" if r.baseline else "")
        if not r.ok and not r.completed_phases:
            rows.append([label, "FAILED: " + (r.error or "?")] + ["-"] * len(COLUMNS))
            continue
        if not r.ok:  # the figures of the phases it finished, with what failed after them
            status = f"FAILED in {r.phase} (kept: {', '.join(r.completed_phases)}): {r.error or '?'}"
            rows.append([label, status] + [_num(_value(r, m), fmt, scale, err) for _, m, fmt, scale, err in COLUMNS])
            continue
        rows.append([label, "ok"] + [_num(_value(r, m), fmt, scale, err) for _, m, fmt, scale, err in COLUMNS])
    # Drop columns that no record has a value for (e.g. a suite without tasks).
    keep = [i for i in range(len(headers)) if i < 2 or any(row[i] != "-" for row in rows)]
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


def markdown_table(records: list[CellRecord]) -> str:
    headers, rows = table_rows(records)
    lines = markdown_rows(headers, rows)
    notes = [f"- {md_text(r.cell)}: {md_text(note)}" for r in records for note in r.notes]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines)
