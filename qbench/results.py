"""The append-only results store and its pandas views.

One JSON line per finished cell, flushed and fsynced as soon as the cell ends.
Records are never rewritten; when a cell is run again (``--retry-failed``) or
gains a latency trial, a new line holds its whole new record, and the newest
record of each cell is the one views show.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd
from pydantic import ValidationError

from qbench.errors import QBenchError, describe_validation
from qbench.io import write_atomic
from qbench.paths import cache_dir, results_dir
from qbench.records import CellRecord

RESULTS_FILE = "results.jsonl"
PLAN_FILE = "plan.json"
#: Where a record goes when results.jsonl cannot take it (see ResultStore.append).
PENDING_DIR = "pending"


class ResultStore:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS_FILE

    def repair_tail(self) -> Optional[str]:
        """A writer killed mid-line leaves a fragment without its newline;
        appending after it would glue the next record onto it and lose both.
        Move the fragment aside (``results.jsonl.torn-<time>``) and cut the
        file back to its last whole line. Returns what was done, or None."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return None
        cut = data.rfind(b"\n") + 1
        aside = self.path.with_name(f"{RESULTS_FILE}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.write_bytes(data[cut:])
        with open(self.path, "r+b") as handle:
            handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())
        return (f"{self.path} ended in a half-written line ({len(data) - cut} bytes, from a killed run): moved it "
                f"to {aside}; its cell counts as not run")

    def append(self, record: CellRecord) -> None:
        """Append one record, flushed and fsynced. A finished measurement is
        never dropped: when the file cannot take it, the record is saved in
        a pending file (the next ``--resume`` appends it) and the error says
        where."""
        line = CellRecord.model_validate(record.model_dump(by_alias=True)).to_json()  # validate before writing
        try:
            with open(self.path, "a") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            saved = save_pending(self.run_dir, record)
            raise QBenchError(f"cannot append to {self.path} ({exc.strerror or type(exc).__name__}): the record of "
                              f"{record.cell} is kept in {saved}; fix the folder, then `qbench run --resume "
                              f"{self.run_dir}` adds it") from None

    def records(self) -> list[CellRecord]:
        if not self.path.is_file():
            return []
        out = []
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise QBenchError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        lines = data.decode("utf-8", errors="replace").split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            torn = number == len(lines)  # no newline after it: a killed writer's fragment
            try:
                out.append(CellRecord.model_validate_json(line))
            except ValidationError as exc:
                if torn:
                    warnings.warn(f"{self.path}:{number}: ignoring an incomplete last line")
                    continue
                raise QBenchError(f"{self.path}:{number}: not a qbench record ({describe_validation(exc)}); was the file "
                                  "edited by hand? Remove that line or start a new run") from None
        return out

    def latest(self) -> dict[str, CellRecord]:
        """Newest record per cell, in first-seen order."""
        latest: dict[str, CellRecord] = {}
        for record in self.records():
            latest[record.cell] = record  # an update keeps the cell's place
        return latest

    def adopt_pending(self) -> list[str]:
        """Append records that an earlier run saved aside because this file
        could not take them; returns their cells."""
        adopted = []
        for path in pending_files(self.run_dir):
            try:
                record = CellRecord.model_validate_json(path.read_text())
            except (ValidationError, OSError) as exc:
                warnings.warn(f"{path}: not a readable record ({type(exc).__name__}): left where it is")
                continue
            if record.run_id != self.run_dir.name and record.run_id != _plan_run_id(self.run_dir):
                continue
            self.append(record)
            path.unlink()
            adopted.append(record.cell)
        return adopted


def cell_file_stem(cell: str) -> str:
    """A cell name as a file name: "torchao:int4-wo-g32" -> "torchao__int4-wo-g32"."""
    return cell.replace(":", "__").replace("/", "_")[:120]


def _plan_run_id(run_dir: Path) -> Optional[str]:
    try:
        return json.loads((run_dir / PLAN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _pending_places(run_dir: Path) -> list[Path]:
    name = Path(run_dir).resolve().name
    return [Path(run_dir) / PENDING_DIR, cache_dir() / PENDING_DIR / name,
            Path(tempfile.gettempdir()) / "qbench-pending" / name]


def save_pending(run_dir: Path, record: CellRecord) -> Path:
    """Write ``record`` to the first pending folder that takes it."""
    errors = []
    stamp = f"{time.time():.6f}"
    for folder in _pending_places(run_dir):
        target = folder / f"{cell_file_stem(record.cell)}-{stamp}.json"
        try:
            write_atomic(target, record.to_json())
            return target
        except OSError as exc:
            errors.append(f"{folder}: {exc.strerror or exc}")
    raise QBenchError(f"the record of {record.cell} could not be saved anywhere ({'; '.join(errors)}); its JSON "
                      f"follows: {record.to_json()}")


def pending_files(run_dir: Path) -> list[Path]:
    """Pending records of this run folder. Only files this user owns: the
    temp folder is shared, and another user must not slip rows into a run."""
    found: list[Path] = []
    for folder in _pending_places(run_dir):
        if folder.is_dir():
            found += sorted(p for p in folder.glob("*.json") if p.stat().st_uid == os.getuid())
    return found


def find_run(run: str | Path, root: Optional[str | Path] = None) -> Path:
    """A run id (under ``root``, default the results folder) or a run folder path."""
    root = Path(root) if root else results_dir()
    path = Path(run)
    for candidate in (path, root / str(run)):
        if (candidate / PLAN_FILE).is_file():
            return candidate
    runs = sorted(p.name for p in root.glob("*") if (p / PLAN_FILE).is_file()) if root.is_dir() else []
    hint = f"; runs under {root}: {', '.join(runs[-5:])}" if runs else ""
    raise QBenchError(f"run '{run}' not found (no {PLAN_FILE}){hint}")


def frame(records: Iterable[CellRecord]) -> pd.DataFrame:
    """One row per cell: identity columns, then ``<metric>`` values and
    ``<metric>_stderr`` where an error estimate exists."""
    rows = []
    for r in records:
        row: dict[str, Any] = {"cell": r.cell, "backend": r.backend, "variant": r.variant,
                               "baseline": r.baseline, "status": r.status, "error": r.error}
        for name, m in r.metrics.items():
            row[name] = m.value
            if m.stderr is not None:
                row[f"{name}_stderr"] = m.stderr
        rows.append(row)
    return pd.DataFrame(rows)


def tidy(records: Iterable[CellRecord]) -> pd.DataFrame:
    """Long form: one row per cell x metric, with unit, n and stderr."""
    rows = []
    for r in records:
        for name, m in r.metrics.items():
            rows.append({"run_id": r.run_id, "cell": r.cell, "metric": name, "value": m.value, "unit": m.unit,
                         "n": m.n, "stderr": m.stderr})
    return pd.DataFrame(rows, columns=["run_id", "cell", "metric", "value", "unit", "n", "stderr"])


def load_results(run: str | Path, latest: bool = True) -> pd.DataFrame:
    """The comparison table of a run as a DataFrame (one row per cell)."""
    store = ResultStore(find_run(run))
    return frame(store.latest().values() if latest else store.records())
