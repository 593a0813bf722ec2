"""The report's charts, described once and drawn twice: a PNG (matplotlib)
for report.md on GitHub, and an interactive Plotly chart for report.html
(hover for a row's figures, click a legend entry to hide the row; plotly.js
is inlined once, so the page needs no network).

Every row gets its own colour and marker from one list (ten colours, then
the next marker shape), and rows are named in a legend outside the plot
area, never by text beside a point: labels beside points overlap as soon
as two rows sit close, which is exactly where a reader needs to tell them
apart."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

#: Ten colours that print and project apart (matplotlib's tab10 = Plotly's T10-like D3 palette).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: Marker shapes, one per round of ten rows: (matplotlib, Plotly).
MARKERS = (
    ("o", "circle"),
    ("s", "square"),
    ("D", "diamond"),
    ("^", "triangle-up"),
    ("v", "triangle-down"),
    ("P", "cross"),
    ("X", "x"),
    ("*", "star"),
)
#: Where a log axis draws zero (a baseline's KLD): Plotly has no symlog scale.
LOG_FLOOR = 1e-5


@dataclass
class Series:
    """One row of the report (or a line joining rows, such as a Pareto front)."""

    name: str
    x: list
    y: list
    #: error bars along the value axis (y; x for a horizontal chart), or None
    err: Optional[list] = None
    #: one text per point, shown on hover
    hover: Optional[list[str]] = None
    lines: bool = False
    dashed: bool = False
    #: a guide (the front) rather than a row: no marker, drawn in grey-red
    guide: bool = False


@dataclass
class Chart:
    file: str
    caption: str
    x_title: str
    y_title: str
    series: list[Series] = field(default_factory=list)
    #: "linear", "log" (base 10), "log2", or "symlog" (zero allowed; Plotly draws it as log with 0 at LOG_FLOOR)
    x_scale: str = "linear"
    y_scale: str = "linear"
    #: y holds category names (tasks): rows are drawn side by side within each category
    categories: tuple[str, ...] = ()


def style(index: int) -> tuple[str, tuple[str, str]]:
    return COLOURS[index % len(COLOURS)], MARKERS[(index // len(COLOURS)) % len(MARKERS)]


def png(chart: Chart) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in chart.series if not s.guide]
    # Tall enough for the legend's entries, never wider than a page.
    points = len(rows) * max(len(chart.categories), 1)
    fig, ax = plt.subplots(figsize=(7.5, max(4.5, 0.9 + 0.22 * len(rows), 0.6 + 0.13 * points)))
    positions = {c: i for i, c in enumerate(chart.categories)}
    for i, s in enumerate(rows):
        colour, (marker, _) = style(i)
        if chart.categories:  # rows side by side within each category
            offset = (i - (len(rows) - 1) / 2) * min(0.8 / max(len(rows), 1), 0.15)
            ys = [positions[c] + offset for c in s.y]
            ax.errorbar(s.x, ys, xerr=s.err, fmt=marker, color=colour, label=s.name, capsize=2, markersize=5)
            continue
        ax.errorbar(
            s.x,
            s.y,
            yerr=s.err,
            fmt=marker + ("-" if s.lines else ""),
            color=colour,
            label=s.name,
            capsize=2,
            markersize=5,
        )
    for s in chart.series:
        if s.guide:
            ax.plot(s.x, s.y, "--", color="tab:red", alpha=0.6, label=s.name)
    for axis, scale in ((ax.xaxis, chart.x_scale), (ax.yaxis, chart.y_scale)):
        setter = ax.set_xscale if axis is ax.xaxis else ax.set_yscale
        if scale == "symlog":
            setter("symlog", linthresh=1e-4)
            # symlog draws its figures (KLD) from 0: no half of the plot for negative values none can take
            # (and with headroom above the largest, which symlog's margins leave at the edge)
            low, high = ax.get_xlim() if axis is ax.xaxis else ax.get_ylim()
            (ax.set_xlim if axis is ax.xaxis else ax.set_ylim)(0, high * 1.5 if high > 0 else None)
        elif scale == "log":
            setter("log")
        elif scale == "log2":
            setter("log", base=2)
    if chart.categories:
        ax.set_yticks(range(len(chart.categories)), chart.categories)
        ax.invert_yaxis()
    ax.set_xlabel(chart.x_title + (" (symlog)" if chart.x_scale == "symlog" else ""))
    ax.set_ylabel(chart.y_title + (" (symlog)" if chart.y_scale == "symlog" else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", borderaxespad=0)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plotly_axis(scale: str, title: str) -> dict:
    if scale == "symlog":
        return {"type": "log", "title": {"text": f"{title} (log; 0 drawn at {LOG_FLOOR:g})"}}
    if scale in ("log", "log2"):
        return {"type": "log", "title": {"text": title}}
    return {"title": {"text": title}}


def _floored(values: list, scale: str) -> list:
    return [max(v, LOG_FLOOR) if scale == "symlog" and v is not None else v for v in values]


def plotly_div(chart: Chart, div_id: str) -> str:
    """The chart as a ``<div>`` and the script that draws it; plotly.js
    itself is not included (the page inlines it once: ``plotly_script``)."""
    import plotly.graph_objects as go
    import plotly.io as pio

    fig = go.Figure()
    rows = [s for s in chart.series if not s.guide]
    horizontal = bool(chart.categories)
    for i, s in enumerate(rows):
        colour, (_, symbol) = style(i)
        error = {"type": "data", "array": s.err, "visible": True} if s.err else None
        fig.add_trace(
            go.Scatter(
                x=_floored(s.x, chart.x_scale),
                y=_floored(s.y, chart.y_scale),
                name=s.name,
                mode="lines+markers" if s.lines else "markers",
                marker={"color": colour, "symbol": symbol, "size": 9},
                line={"color": colour},
                error_x=error if horizontal else None,
                error_y=None if horizontal else error,
                text=s.hover,
                hovertemplate="%{text}<extra></extra>" if s.hover else None,
                orientation="h" if horizontal else None,
            )
        )
    for s in chart.series:
        if s.guide:
            fig.add_trace(
                go.Scatter(
                    x=_floored(s.x, chart.x_scale),
                    y=_floored(s.y, chart.y_scale),
                    name=s.name,
                    mode="lines",
                    line={"color": "rgba(214,39,40,0.6)", "dash": "dash"},
                    hoverinfo="skip",
                )
            )
    points = len(rows) * max(len(chart.categories), 1)  # a task chart draws every row in every task
    layout: dict[str, Any] = {
        "template": "plotly_white",
        "height": max(420, 120 + 22 * len(rows), 80 + 14 * points),
        "margin": {"t": 30},
        "xaxis": _plotly_axis(chart.x_scale, chart.x_title),
        "yaxis": _plotly_axis(chart.y_scale, chart.y_title),
        "legend": {"title": {"text": "click to hide a row"}},
        "hovermode": "closest",
    }
    if horizontal:  # rows side by side within each task, tasks top to bottom
        layout["scattermode"] = "group"
        layout["yaxis"].update(categoryorder="array", categoryarray=list(chart.categories), autorange="reversed")
    fig.update_layout(**layout)
    return pio.to_html(
        fig, include_plotlyjs=False, full_html=False, div_id=div_id, config={"displaylogo": False, "responsive": True}
    )


def plotly_script() -> str:
    """plotly.js, for inlining once in a page."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()
