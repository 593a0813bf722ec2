"""Workflows that end in a published report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

from qbench.analyze.search import CELLS, PLOT_FILE, SearchResult, run_search
from qbench.execute.runner import Reporter, SilentReporter
from qbench.present.report import write_report
from qbench.present.search_report import write_plot
from qbench.sdk.models import DEFAULT_MODEL


def search(
    budget: str,
    backends: Optional[list[str]] = None,
    model: str = DEFAULT_MODEL,
    suite: str = "default",
    device: str = "auto",
    unit: str = "type",
    tokens: int = 1024,
    base: Optional[str] = None,
    output_dir: Optional[str] = None,
    run_id: Optional[str] = None,
    reporter: Reporter = SilentReporter(),
    on_step: Callable[[str], None] = lambda message: None,
) -> SearchResult:
    """``qbench search``: the smallest configuration meeting ``budget``
    (``"kld<=0.05"``, ``"acc>=0.99*base"``, ``"weights<=150MiB"``) among the
    uniform variants of ``backends`` and torchao recipes that upgrade the
    most sensitive units of one of them. Returns a ``SearchResult`` (every
    configuration tried, the chosen one, why, the cost) and writes its plot
    and the report of its cells; rerun with the same ``run_id`` to finish an
    interrupted search."""
    result = run_search(
        budget, backends, model, suite, device, unit, tokens, base, output_dir, run_id, reporter, on_step
    )
    folder = Path(result.folder)
    write_plot(result, folder / PLOT_FILE)
    write_report(folder / CELLS)
    return result
