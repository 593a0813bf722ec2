"""The append-only results store and its pandas views.

One JSON line per finished cell, flushed and fsynced as soon as the cell ends.
Records are never rewritten; when a cell is run again (``--retry-failed``) or
gains a latency trial, a new line holds its whole new record, and the newest
record of each cell is the one views show.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import ValidationError

from qbench.core.errors import QBenchError, describe_validation
from qbench.core.io import write_atomic
from qbench.core.paths import cache_dir, results_dir
from qbench.core.records import CellRecord, Metric, NewerSchema, parse_record
from qbench.metrics.registry import info

if TYPE_CHECKING:  # pandas is imported by the views that build frames: reading records stays quick
    import pandas as pd

RESULTS_FILE = "results.jsonl"
PLAN_FILE = "plan.json"
#: Where a record goes when results.jsonl cannot take it (see ResultStore.append).
PENDING_DIR = "pending"
#: Longest record qbench reads (a line of results.jsonl, a pending file).
MAX_RECORD_BYTES = 64 * 2**20
#: The advisory lock of a run folder: one process measures a run at a time.
LOCK_FILE = "run.lock"
#: Files of a run folder that are views of its records, written again by
#: `qbench report` and `qbench export`; every other file in a run folder is
#: the run's own and no command writes over it.
DERIVED_FILES = frozenset({"results.csv", "results.parquet", "report.md", "report.html"})


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
        return (
            f"{self.path} ended in a half-written line ({len(data) - cut} bytes, from a killed run): moved it "
            f"to {aside}; its cell counts as not run"
        )

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
            raise QBenchError(
                f"cannot append to {self.path} ({exc.strerror or type(exc).__name__}): the record of "
                f"{record.cell} is kept in {saved}; fix the folder, then `qbench run --resume "
                f"{self.run_dir}` adds it"
            ) from None

    def records(self) -> list[CellRecord]:
        """Every record, in order, read line by line: a line longer than
        ``MAX_RECORD_BYTES`` is an error, never read whole into memory."""
        if not self.path.is_file():
            return []
        out = []
        try:
            handle = open(self.path, "rb")
        except OSError as exc:
            raise QBenchError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        with handle:
            number = 0
            while True:
                raw = handle.readline(MAX_RECORD_BYTES + 1)
                if not raw:
                    break
                number += 1
                if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                    raise QBenchError(
                        f"{self.path}:{number}: a line longer than {MAX_RECORD_BYTES // 2**20} MiB is "
                        "not a qbench record: restore the file from a copy, or start a new run"
                    )
                torn = not raw.endswith(b"\n")  # no newline after it: a killed writer's fragment
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                try:
                    out.append(parse_record(line))
                except NewerSchema as exc:
                    raise QBenchError(f"{self.path}:{number}: {exc}") from None
                except ValueError as exc:  # pydantic's ValidationError is one
                    if torn:
                        warnings.warn(f"{self.path}:{number}: ignoring an incomplete last line", stacklevel=2)
                        continue
                    why = describe_validation(exc) if isinstance(exc, ValidationError) else str(exc)
                    raise QBenchError(
                        f"{self.path}:{number}: not a qbench record ({why}): the line "
                        "was changed by hand or by another tool; restore it from a copy of the file, "
                        "or start a new run"
                    ) from None
        return out

    def latest(self) -> dict[str, CellRecord]:
        """Newest record per cell, in first-seen order."""
        latest: dict[str, CellRecord] = {}
        for record in self.records():
            latest[record.cell] = record  # an update keeps the cell's place
        return latest

    def adopt_pending(self, plan) -> list[str]:
        """Append records that an earlier run saved aside because this file
        could not take them; returns their cells. A record is adopted only
        when it is this run's: its run id, suite hash, model fingerprint and
        cell (backend, variant, baseline) all as the plan has them. Another
        run's record (another run id) is left alone; one that claims this
        run but differs from its plan is moved to ``rejected/`` beside it,
        with a warning that says why. ``plan``: the run's ``RunPlan``."""
        adopted = []
        for path in pending_files(self.run_dir):
            try:
                record = parse_record(path.read_text())
            except (ValueError, OSError) as exc:  # ValidationError, NewerSchema and UnicodeDecodeError are ValueErrors
                why = str(exc) if isinstance(exc, NewerSchema) else f"not a readable record ({type(exc).__name__})"
                warnings.warn(f"{path}: {why}: left where it is", stacklevel=2)
                continue
            if record.run_id != plan.run_id:
                continue
            why = mismatch(record, plan)
            if why:
                aside = path.parent / "rejected" / path.name
                try:
                    aside.parent.mkdir(exist_ok=True)
                    path.replace(aside)
                except OSError:
                    aside = path
                warnings.warn(
                    f"pending record {path.name} was not added to run {plan.run_id}: {why}; set aside in {aside}",
                    stacklevel=2,
                )
                continue
            self.append(record)
            path.unlink()
            adopted.append(record.cell)
        return adopted


def mismatch(record: CellRecord, plan) -> Optional[str]:
    """Why ``record`` is not a record of a cell of ``plan`` (None when it is)."""
    cell = next((c for c in plan.cells if c.cell == record.cell), None)
    if cell is None:
        return f"its cell {record.cell} is not in the run's plan"
    if (cell.backend, cell.variant_text, cell.baseline) != (record.backend, record.variant, record.baseline):
        return f"its cell {record.cell} is not the plan's (backend, variant or baseline differ)"
    if record.suite.hash != plan.suite_hash:
        return f"it measured suite hash {record.suite.hash}, the run's suite is {plan.suite_hash}"
    if record.model.fingerprint != plan.model.fingerprint:
        return f"it measured model {record.model.fingerprint}, the run's model is {plan.model.fingerprint}"
    if record.device != plan.device:
        return f"it ran on {record.device}, the run's device is {plan.device}"
    return None


def cell_file_stem(cell: str) -> str:
    """A cell name as a file name: "torchao:int4-wo-g32" -> "torchao__int4-wo-g32"."""
    return cell.replace(":", "__").replace("/", "_")[:120]


def _pending_places(run_dir: Path) -> list[Path]:
    name = Path(run_dir).resolve().name
    return [
        Path(run_dir) / PENDING_DIR,
        cache_dir() / PENDING_DIR / name,
        Path(tempfile.gettempdir()) / "qbench-pending" / name,
    ]


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
    raise QBenchError(
        f"the record of {record.cell} could not be saved anywhere ({'; '.join(errors)}); its JSON "
        f"follows: {record.to_json()}"
    )


def pending_files(run_dir: Path) -> list[Path]:
    """Pending records of this run folder. Only files this user owns: the
    temp folder is shared, and another user must not slip rows into a run."""
    found: list[Path] = []
    for folder in _pending_places(run_dir):
        if folder.is_dir():
            # plain files only (a link to a device or a pipe would never end), of sane size
            found += sorted(
                p
                for p in folder.glob("*.json")
                if not p.is_symlink()
                and p.is_file()
                and p.stat().st_uid == os.getuid()
                and p.stat().st_size <= MAX_RECORD_BYTES
            )
    return found


def find_run(run: str | Path, root: Optional[str | Path] = None) -> Path:
    """A run id (under ``root``, default the results folder) or a run folder path."""
    root = Path(root) if root else results_dir()
    path = Path(run)
    for candidate in (path, root / str(run)):
        if (candidate / PLAN_FILE).is_file():
            return candidate
    runs = sorted(p.name for p in root.glob("*") if (p / PLAN_FILE).is_file()) if root.is_dir() else []
    hint = (
        f"; runs there: {', '.join(runs[-5:])}" if runs else ""
    ) + "; give the run folder's path (a run made with -o DIR lies in DIR/RUN_ID), or set $QBENCH_RESULTS to DIR"
    other = (root / str(run)).resolve()
    looked = f"{path.resolve()}" + (f" and {other}" if path.resolve() != other else "")
    raise QBenchError(f"run '{run}' not found (no {PLAN_FILE} in {looked}){hint}")


def run_folder_of(path: Path) -> Optional[Path]:
    """The run folder ``path`` lies in (a folder above it holding a plan), if any."""
    for folder in Path(path).parents:
        if (folder / PLAN_FILE).is_file():
            return folder
    return None


def check_output(path: str | Path, force: bool = False, option: str = "--force") -> Path:
    """A file a command is about to write for the user, refused in one line
    when writing it would lose something: a file of a run folder that is not
    one of its views (its records, plan, reference, pending records, logs)
    whatever ``force`` says, and any other existing file unless ``force``."""
    target = Path(path).expanduser()
    resolved = target.resolve()  # a link to results.jsonl is results.jsonl
    if resolved.is_dir():
        raise QBenchError(f"cannot write {target}: it is a folder; give a file name")
    run = run_folder_of(resolved)
    if run is not None and resolved.exists() and (resolved.parent != run or resolved.name not in DERIVED_FILES):
        raise QBenchError(
            f"refusing to write {target}: it is {resolved.relative_to(run)} of run folder {run}, "
            f"and writing it would lose the run's data; choose another file"
        )
    if resolved.exists() and not force:
        raise QBenchError(f"{target} already exists: choose another file, or pass {option} to replace it")
    if not resolved.parent.is_dir():
        raise QBenchError(f"cannot write {target}: folder {resolved.parent} does not exist (create it first)")
    return target


_held_locks: dict[Path, list] = {}  # run folder -> [open lock file, depth]


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder's advisory lock (``run.lock``, flock) while
    measuring, so that two processes never run one run's cells at once. The
    same process may take it again (a search runs its cells in steps). A
    second process gets one line naming the holder (pid, host, since when);
    the lock goes with the process, so a killed run never leaves it held."""
    key = Path(run_dir).resolve()
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    lock_path = key / LOCK_FILE
    try:
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise QBenchError(
            f"cannot open the run's lock {lock_path} ({exc.strerror or exc}): fix the run folder's permissions"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise QBenchError(
            f"run {key.name} is being measured by {holder}: wait for it to finish (or stop that "
            "process), then --resume it; one process runs a run's cells at a time"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"qbench pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    handle.flush()
    _held_locks[key] = [handle, 1]
    try:
        yield
    finally:
        del _held_locks[key]
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def frame(records: Iterable[CellRecord]) -> pd.DataFrame:
    """One row per cell: identity columns, then ``<metric>`` values and
    ``<metric>_stderr`` where an error estimate exists."""
    import pandas as pd

    rows = []
    for r in records:
        row: dict[str, Any] = {
            "cell": r.cell,
            "backend": r.backend,
            "variant": r.variant,
            "baseline": r.baseline,
            "status": r.status,
            "error": r.error,
        }
        for name, m in r.metrics.items():
            row[name] = m.value
            if m.stderr is not None:
                row[f"{name}_stderr"] = m.stderr
        rows.append(row)
    return pd.DataFrame(rows)


TIDY_COLUMNS = ["run_id", "cell", "task", "context", "metric", "value", "unit", "n", "stderr", "higher_is_better"]


def tidy(records: Iterable[CellRecord]) -> pd.DataFrame:
    """Long form: one row per cell x metric, with unit, n and stderr; then
    one per cell x task x metric (``task`` empty for the cell's own metrics),
    named as the task's engine names them (lm-eval's for ``lm_eval:`` tasks);
    then one per cell x context length x metric of a long-context run
    (``context`` empty elsewhere); ``higher_is_better`` from the metric
    registry (empty where neither is)."""
    import pandas as pd

    rows = []
    for r in records:
        figures: list[tuple[str, Optional[int], str, Metric]] = [("", None, name, m) for name, m in r.metrics.items()]
        figures += [(task, None, name, m) for task, metrics in r.tasks.items() for name, m in metrics.items()]
        figures += [
            ("", length, name, m) for length, metrics in sorted(r.context_sweep.items()) for name, m in metrics.items()
        ]
        rows += [
            {
                "run_id": r.run_id,
                "cell": r.cell,
                "task": task,
                "context": length,
                "metric": name,
                "value": m.value,
                "unit": m.unit,
                "n": m.n,
                "stderr": m.stderr,
                "higher_is_better": info(name).higher_is_better,
            }
            for task, length, name, m in figures
        ]
    return pd.DataFrame(rows, columns=TIDY_COLUMNS).astype({"context": "Int64"})


def load_results(run: str | Path, latest: bool = True) -> pd.DataFrame:
    """The comparison table of a run as a DataFrame (one row per cell)."""
    store = ResultStore(find_run(run))
    return frame(store.latest().values() if latest else store.records())
