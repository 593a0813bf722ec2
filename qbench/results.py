"""The append-only results store and its pandas views.

One JSON line per finished cell, flushed and fsynced as soon as the cell ends.
Records are never rewritten; when a cell is run again (``--retry-failed``) or
gains a latency trial, a new line holds its whole new record, and the newest
record of each cell is the one views show.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from qbench.errors import QBenchError
from qbench.paths import results_dir

RESULTS_FILE = "results.jsonl"
PLAN_FILE = "plan.json"

class ResultStore:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS_FILE

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                if number == len(lines):  # torn last line of a killed writer: the cell reruns on resume
                    warnings.warn(f"{self.path}:{number}: ignoring an incomplete last line")
                else:
                    raise QBenchError(f"{self.path}:{number}: corrupt record; the file was edited by hand?") from None
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """Newest record per cell, in first-seen order."""
        latest: dict[str, dict[str, Any]] = {}
        for record in self.records():
            latest[record["cell"]] = record  # an update keeps the cell's place
        return latest


def find_run(run: str | Path) -> Path:
    """A run id (under the results folder) or a run folder path."""
    path = Path(run)
    for candidate in (path, results_dir() / str(run)):
        if (candidate / PLAN_FILE).is_file():
            return candidate
    runs = sorted(p.name for p in results_dir().glob("*") if (p / PLAN_FILE).is_file())
    hint = f"; runs under {results_dir()}: {', '.join(runs[-5:])}" if runs else ""
    raise QBenchError(f"run '{run}' not found (no {PLAN_FILE}){hint}")


def frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell: identity columns, then ``<metric>`` values and
    ``<metric>_stderr`` where an error estimate exists."""
    rows = []
    for r in records:
        row: dict[str, Any] = {"cell": r["cell"], "backend": r["backend"], "variant": r["variant"],
                               "baseline": r.get("baseline", False), "status": r["status"],
                               "error": r.get("error")}
        for name, m in (r.get("metrics") or {}).items():
            if isinstance(m, dict) and "value" in m:
                row[name] = m["value"]
                if m.get("stderr") is not None:
                    row[f"{name}_stderr"] = m["stderr"]
        rows.append(row)
    return pd.DataFrame(rows)


def tidy(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long form: one row per cell x metric, with unit, n and stderr."""
    rows = []
    for r in records:
        for name, m in (r.get("metrics") or {}).items():
            if isinstance(m, dict) and "value" in m:
                rows.append({"run_id": r.get("run_id"), "cell": r["cell"], "metric": name, "value": m["value"],
                             "unit": m.get("unit"), "n": m.get("n"), "stderr": m.get("stderr")})
    return pd.DataFrame(rows)


def load_results(run: str | Path, latest: bool = True) -> pd.DataFrame:
    """The comparison table of a run as a DataFrame (one row per cell)."""
    store = ResultStore(find_run(run))
    return frame(store.latest().values() if latest else store.records())
