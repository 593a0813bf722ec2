"""Plan a run (model x suite x backend variants) and execute each cell in its
own worker process, appending a record as soon as each cell ends; then the
latency trials, each in a worker of its own. Where the workers run is an
executor's choice (this machine here, a Ray cluster in qbench.execute.ray_executor);
records are written here, by this process alone."""

from __future__ import annotations

import multiprocessing
import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol

from pydantic import BaseModel, Field, ValidationError

from qbench.cell.worker import CellTask, worker_main
from qbench.core.cells import CellSpec
from qbench.core.errors import QBenchError, describe_validation
from qbench.core.io import write_atomic
from qbench.core.parallel import run_cells
from qbench.core.records import CellRecord
from qbench.execute.results import PLAN_FILE, ResultStore, cell_file_stem, run_lock
from qbench.sdk.models import ModelSpec
from qbench.sdk.registry import LoadedPlugins, PluginSettings, get_backend

DEFAULT_BASELINE = "fp:fp32"


def default_baseline(device: str) -> str:
    """The reference a run compares against when ``--baseline`` names none:
    the model in the dtype a user of that device computes in (float32 on a
    CPU, bfloat16 on a GPU, where a float32 reference would be neither what
    anyone ships nor a fair speed reference)."""
    return "fp:bf16" if device == "cuda" else DEFAULT_BASELINE


DEFAULT_CELL_TIMEOUT = 3600.0


class RunPlan(BaseModel):
    run_id: str
    created: float
    model: ModelSpec
    suite_path: str
    suite_name: str
    suite_hash: str
    device: str
    threads: Optional[int] = Field(None, ge=1)
    cell_timeout: float = Field(DEFAULT_CELL_TIMEOUT, gt=0, allow_inf_nan=False)
    plugin_dirs: list[str]
    plugin_allow: Optional[list[str]]
    plugin_block: list[str]
    cells: list[CellSpec]
    skipped: dict[str, str] = {}  # cell -> why it was left out of the plan
    #: cell -> what the plan found worth saying before it runs (a compute
    #: dtype other than the baseline's)
    notes: dict[str, str] = {}
    #: the user let the suite read data outside its folder (--allow-outside-data)
    allow_outside_data: bool = False
    #: the user let task files run code (--trust-task-code)
    trust_task_code: bool = False
    #: resolved path -> sha256 prefix of every data file of the suite
    suite_files: dict[str, str] = {}
    #: GPUs the cells run on, one worker each (``--gpus``); empty: the
    #: default device, one cell at a time
    gpus: list[str] = []
    #: GPUs one cell's model is spread over (``--gpus-per-cell``)
    gpus_per_cell: int = Field(1, ge=1)

    def plugin_settings(self) -> PluginSettings:
        return PluginSettings(
            tuple(self.plugin_dirs),
            tuple(self.plugin_allow) if self.plugin_allow is not None else None,
            tuple(self.plugin_block),
        )


class Reporter(Protocol):
    def cell_started(self, cell: str, index: int, total: int) -> None: ...
    def phase(self, cell: str, name: str) -> None: ...
    def cell_finished(self, cell: str, status: str, seconds: float, error: Optional[str]) -> None: ...
    def warn(self, message: str) -> None: ...


class SilentReporter:
    def cell_started(self, cell, index, total):
        pass

    def phase(self, cell, name):
        pass

    def cell_finished(self, cell, status, seconds, error):
        pass

    def warn(self, message):
        pass


def split_backend_specs(specs: list[str]) -> list[str]:
    """Split "fp,bnb:nf4,torchao:bits=4,group_size=64" into cells. A piece
    like "group_size=64" (a setting, no backend prefix) continues the
    previous custom variant rather than starting a new cell."""
    out: list[str] = []
    for spec in specs:
        for piece in (p.strip() for p in spec.split(",")):
            if not piece:
                continue
            key = piece.split("=", 1)[0]
            if "=" in piece and ":" not in key and out and "=" in out[-1]:
                out[-1] += "," + piece
            else:
                out.append(piece)
    return out


def plan_cells(
    loaded: LoadedPlugins, specs: list[str], baseline: str, device: str, from_suite: bool = False
) -> tuple[list[CellSpec], dict[str, str]]:
    """Expand backend specs into cells, baseline first. With no specs (or
    ``all``), every variant of every backend available on ``device``. Unavailable variants
    asked for by name (``backend:variant``) stay in the plan and fail with the
    reason; those reached through a whole backend or "everything" are listed
    as skipped. ``from_suite``: the specs are a suite's default rows, chosen
    for a device: one that cannot run on this one is skipped, not failed."""
    pieces = split_backend_specs(specs)
    if not pieces or pieces == ["all"]:
        pieces = sorted(loaded.backends)
    cells: list[CellSpec] = []
    skipped: dict[str, str] = {}

    def add(spec: CellSpec, explicit: bool = False) -> None:
        backend = get_backend(loaded, spec.backend)
        kv = spec.settings.get("kv_cache")
        if kv is not None and kv not in backend.kv_caches:
            able = sorted(name for name, b in loaded.backends.items() if kv in b.kv_caches)
            offered = ", ".join(backend.kv_caches) if len(backend.kv_caches) > 1 else "full only"
            raise QBenchError(
                f"{spec.cell}: backend {spec.backend} cannot store its KV cache as {kv} (its choices: {offered}); "
                + (f"backends that can: {', '.join(able)}" if able else "no loaded backend can")
            )
        config = backend.config_for(spec.variant, spec.settings)  # validate now, not in the worker
        key, is_baseline = spec.cell, spec.baseline
        if any(c.cell == key for c in cells):
            return
        availability = backend.cell_available(config, device)
        if not availability.ok and (from_suite or not explicit) and not is_baseline:
            skipped[key] = availability.reason
            return
        reason = None if explicit or is_baseline else backend.default_skip_reason(config, device)
        if reason:
            skipped[key] = f"{reason}; ask for it by name (-b {key}) to run it"
            return
        cells.append(spec)

    try:
        base = CellSpec.parse(baseline, baseline=True)
    except QBenchError:
        raise QBenchError(f"--baseline must be backend:variant (e.g. {DEFAULT_BASELINE}), got '{baseline}'") from None
    add(base)
    for piece in pieces:
        if ":" in piece:
            add(CellSpec.parse(piece), explicit=True)
        else:
            for v in get_backend(loaded, piece).variants():
                add(CellSpec(backend=piece, variant=v))
    return cells, skipped


def skipped_summary(skipped: dict[str, str]) -> Optional[str]:
    """One line for the variants a run left out, counted by why."""
    if not skipped:
        return None
    kinds: dict[str, int] = {}
    for why in skipped.values():
        kind = (
            "run by name"
            if "ask for it by name" in why
            else "need CUDA"
            if "CUDA" in why
            else "need a package"
            if "pip install" in why or "missing" in why
            else "cannot run here"
        )
        kinds[kind] = kinds.get(kind, 0) + 1
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda item: -item[1]))
    return (
        f"{len(skipped)} variant(s) not run: {counts} (`qbench backends` says why for each; name one with -b to run it)"
    )


def cast_notes(loaded: LoadedPlugins, cells: list[CellSpec], device: str) -> dict[str, str]:
    """Cells that will compute in another dtype than the baseline, as far as
    the plan can tell (see ``Backend.compute_dtype``); the report says it
    again from what each row recorded."""
    from qbench.core.dtypes import cast_note

    def dtype(cell: CellSpec) -> Optional[str]:
        backend = get_backend(loaded, cell.backend)
        return backend.compute_dtype(backend.config_for(cell.variant, cell.settings), device)

    base = next((c for c in cells if c.baseline), None)
    if base is None:
        return {}
    base_dtype = dtype(base)
    notes = {c.cell: cast_note(dtype(c), base_dtype, base.cell, c.cell) for c in cells if not c.baseline}
    return {cell: note for cell, note in notes.items() if note}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


#: A run id names a folder under the results folder: a plain name, no path.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.fullmatch(run_id) or ".." in run_id:
        raise QBenchError(
            f"--run-id {run_id!r} is not a plain name: use letters, digits, '.', '_' and '-' "
            "(at most 100, starting with a letter or digit; no '/' or '..')"
        )
    return run_id


def save_plan(plan: RunPlan, run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)
        write_atomic(run_dir / PLAN_FILE, plan.model_dump_json(indent=1))
    except OSError as exc:
        raise QBenchError(
            f"cannot write the run folder {run_dir} ({exc.strerror or exc}): choose another with "
            "-o/--output-dir (or $QBENCH_RESULTS), or fix its permissions"
        ) from None


def load_plan(run_dir: Path) -> RunPlan:
    try:
        return RunPlan.model_validate_json((run_dir / PLAN_FILE).read_text())
    except (ValueError, OSError) as exc:
        raise QBenchError(
            f"{run_dir / PLAN_FILE} is unreadable ({type(exc).__name__}); that run cannot be shown or "
            "resumed: start a new run"
        ) from None


def pending_cells(plan: RunPlan, store: ResultStore, retry_failed: bool) -> list[CellSpec]:
    latest = store.latest()
    todo = []
    for cell in plan.cells:
        record = latest.get(cell.cell)
        if record is None or (retry_failed and not record.ok):
            todo.append(cell)
    return todo


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Fail before any cell runs when ``folder`` cannot take new files: a
    cell measured for minutes must not meet a read-only folder at the end."""
    probe = folder / f".qbench-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise QBenchError(f"the {what} {folder} is not writable ({exc.strerror or exc}): {fix}") from None


def preflight(run_dir: Path, store: ResultStore, reporter: Reporter) -> None:
    """Before any cell: the results and cache folders take files, a torn
    last line is moved aside, and records saved aside by an earlier run
    that could not append are added."""
    from qbench.core.paths import cache_dir

    check_writable(run_dir, "run folder", "fix its permissions, or start a new run with -o pointing elsewhere")
    if store.path.exists() and not os.access(store.path, os.W_OK):
        raise QBenchError(f"{store.path} is not writable: fix its permissions (chmod u+w) before running")
    check_writable(cache_dir() / "artifacts", "artifact cache", "set $QBENCH_CACHE to a writable folder")
    try:
        (run_dir / "logs").mkdir(exist_ok=True)  # each worker writes its log there; someone may have deleted it
    except OSError as exc:
        raise QBenchError(
            f"cannot create {run_dir / 'logs'} ({exc.strerror or exc}): fix the run folder's permissions"
        ) from None
    repaired = store.repair_tail()
    if repaired:
        reporter.warn(repaired)
    for cell in store.adopt_pending(load_plan(run_dir)):
        reporter.warn(f"added the record of {cell} that an earlier run saved aside")


class Numbered:
    """A reporter that numbers one executor call's cells within the whole
    run's (the baseline runs alone first, then the others): [1/6], [2/6] ...
    rather than [1/1], [1/5]."""

    def __init__(self, inner: Reporter, offset: int, total: int):
        self.inner, self.offset, self.total = inner, offset, total

    def cell_started(self, cell: str, index: int, total: int) -> None:
        self.inner.cell_started(cell, index + self.offset, self.total)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class Job(NamedTuple):
    """One worker's task: a whole cell, or one latency trial of it."""

    cell: CellSpec
    label: str  # what the progress display calls it
    latency_trial: int = 0  # 0: the whole cell


class WorkerResult(NamedTuple):
    outcome: tuple[str, dict[str, Any]]  # ("result", payload) or ("error", {"phase", "error"})
    started: float
    log: Path


class Executor(Protocol):
    """Where workers run: this machine (``LocalExecutor``: one at a time, or
    one per GPU with ``--gpus``) or a Ray cluster (``qbench.execute.ray_executor``)."""

    def run(
        self,
        plan: RunPlan,
        run_dir: Path,
        jobs: list[Job],
        finish: Callable[[Job, WorkerResult], None],
        reporter: Reporter,
        alone: bool = False,
        placed: Optional[Callable[[Job], Optional[str]]] = None,
    ) -> None:
        """Run every job's worker and call ``finish(job, result)`` in the
        calling thread as each ends. ``alone``: one job at a time on one
        device (the baseline). ``placed(job)``: where the job must run (a
        latency trial where its cell was measured), as ``placement`` said."""

    def placement(self, record: CellRecord) -> Optional[str]:
        """Where a record was measured, in the terms ``placed`` uses."""

    def close(self) -> None: ...


class LocalExecutor:
    """Workers on this machine: one after another, or one per GPU of the
    plan's ``--gpus`` at once (qbench.core.parallel)."""

    def run(self, plan, run_dir, jobs, finish, reporter, alone=False, placed=None) -> None:
        position = iter(range(1, len(jobs) + 1))

        def work(job: Job, gpu: Optional[str], lane_reporter) -> WorkerResult:
            lane_reporter.cell_started(job.label, next(position), len(jobs))
            return run_worker(plan, run_dir, job.cell, lane_reporter, job.latency_trial, gpu)

        run_cells(jobs, plan.gpus[:1] if alone else plan.gpus, work, finish, reporter, placed)

    def placement(self, record: CellRecord) -> Optional[str]:
        """The GPU (``CUDA_VISIBLE_DEVICES``) a cell's worker ran on, if any."""
        return (record.env or {}).get("cuda_visible_devices")

    def close(self) -> None:
        pass


def execute(
    plan: RunPlan,
    run_dir: Path,
    reporter: Reporter = SilentReporter(),
    retry_failed: bool = False,
    executor: Optional[Executor] = None,
    select: Callable[[CellSpec], bool] = lambda cell: True,
) -> list[CellRecord]:
    """Run every unfinished cell of the plan (of those ``select`` picks),
    then the latency trials still missing; return the records written now.
    The run folder is locked meanwhile (see qbench.execute.results.run_lock)."""
    with run_lock(run_dir):
        return _execute(plan, run_dir, reporter, retry_failed, executor, select)


def _execute(plan, run_dir, reporter, retry_failed, executor, select) -> list[CellRecord]:
    executor = executor or LocalExecutor()
    store = ResultStore(run_dir)
    preflight(run_dir, store, reporter)
    jobs = [Job(cell, cell.cell) for cell in pending_cells(plan, store, retry_failed) if select(cell)]
    written: list[CellRecord] = []

    def keep(job: Job, result: WorkerResult) -> None:
        record = cell_record(plan, job.cell, result)
        store.append(record)
        written.append(record)
        reporter.cell_finished(job.label, record.status, record.wall_seconds or 0.0, record.error)

    # The baseline first and alone: every other cell reads its reference.
    first = [job for job in jobs if job.cell.baseline]
    executor.run(plan, run_dir, first, keep, Numbered(reporter, 0, len(jobs)), alone=True)
    executor.run(
        plan, run_dir, [job for job in jobs if not job.cell.baseline], keep, Numbered(reporter, len(first), len(jobs))
    )
    return written + run_latency_trials(plan, run_dir, store, reporter, executor, select)


def run_latency_trials(
    plan: RunPlan,
    run_dir: Path,
    store: ResultStore,
    reporter: Reporter,
    executor: Optional[Executor] = None,
    select: Callable[[CellSpec], bool] = lambda cell: True,
) -> list[CellRecord]:
    """Latency trials 2..K of every finished cell, each in a fresh worker,
    round by round (every cell's trial 2, then every cell's trial 3) so a
    slow spell of the machine does not fall on one cell's trials alone. A
    failed trial leaves the cell's figures as they were, with the reason."""
    from qbench.data.suites import load_suite
    from qbench.metrics.trials import add_trial, trials_attempted

    executor = executor or LocalExecutor()
    latency = load_suite(plan.suite_path, allow_outside_data=plan.allow_outside_data).latency
    wanted = latency.trials if latency else 1
    written = []
    for trial in range(2, wanted + 1):
        fresh_worker_server()
        latest = store.latest()  # read once per round; this round writes each cell's record once
        jobs = [
            Job(c, f"{c.cell} · latency trial {trial} of {wanted}", trial)
            for c in plan.cells
            if select(c) and c.cell in latest and latest[c.cell].ok and 0 < trials_attempted(latest[c.cell]) < trial
        ]

        def keep(job: Job, result: WorkerResult, latest=latest, trial=trial) -> None:
            record, error = latest[job.cell.cell], None
            seconds = round(time.time() - result.started, 3)
            if result.outcome[0] == "result":
                record = add_trial(record, result.outcome[1]["trial"])
            else:
                error = f"latency trial {trial}: {result.outcome[1]['error']}"
                record = record.updated(
                    latency_trial_errors=record.latency_trial_errors + [error],
                    notes=record.notes + [f"{error}; latency comes from the other trials"],
                )
            record = record.updated(trial_wall_seconds=record.trial_wall_seconds + [seconds])
            store.append(record)
            written.append(record)
            reporter.cell_finished(job.label, "failed" if error else "ok", seconds, error)

        # each trial where its cell was measured: a row's trials are one GPU's figures
        executor.run(
            plan,
            run_dir,
            jobs,
            keep,
            reporter,
            placed=partial(_placement_of, executor, latest),
        )
    return written


def _placement_of(executor, latest: dict[str, CellRecord], job: Job):
    """Where a latency trial runs: where its cell was measured (a row's
    trials are one GPU's figures)."""
    return executor.placement(latest[job.cell.cell])


def _base_record(plan: RunPlan, cell: CellSpec) -> dict[str, Any]:
    return {
        "run_id": plan.run_id,
        "cell": cell.cell,
        "backend": cell.backend,
        "variant": cell.variant_text,
        "baseline": cell.baseline,
        "device": plan.device,
        "model": {"name": plan.model.name, "fingerprint": plan.model.fingerprint, "source": plan.model.source},
        "suite": {
            "name": plan.suite_name,
            "path": plan.suite_path,
            "hash": plan.suite_hash,
            "data_files": plan.suite_files,
        },
    }


def cell_record(plan: RunPlan, cell: CellSpec, result: WorkerResult) -> CellRecord:
    """A cell's record from its worker's outcome, identity and timing added."""
    outcome, log_path = result.outcome, result.log
    finished = time.time()
    record = {
        **_base_record(plan, cell),
        "log": str(log_path),
        "finished": finished,
        "wall_seconds": round(finished - result.started, 3),
    }
    if outcome[0] == "result":
        try:
            return CellRecord.model_validate({**record, **outcome[1]})
        except ValidationError as exc:  # a harness bug: say so, keep the cell's place
            outcome = (
                "error",
                {
                    "phase": "record",
                    "error": f"the cell's record is malformed "
                    f"({describe_validation(exc)}): a qbench bug, please report it; see {log_path}",
                },
            )
    failed = {**record, "status": "failed", "phase": outcome[1]["phase"], "error": outcome[1]["error"]}
    if outcome[1].get("partial"):  # phases that finished before the failure keep their figures
        try:
            return CellRecord.model_validate({**outcome[1]["partial"], **failed})
        except ValidationError:
            pass
    return CellRecord.model_validate(failed)


def run_worker(
    plan: RunPlan, run_dir: Path, cell: CellSpec, reporter: Reporter, latency_trial: int = 0, gpu: Optional[str] = None
) -> WorkerResult:
    """Run one task in a fresh worker process, on ``gpu`` alone when given.
    The outcome's kind is "result" or "error"; a worker that died or hung is
    an error naming the phase it was in."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu  # read by CUDA when the worker first touches it
    task = CellTask(
        run_id=plan.run_id,
        run_dir=str(run_dir),
        spec=cell,
        model=plan.model.model_dump(),
        suite_path=plan.suite_path,
        device=plan.device,
        threads=plan.threads,
        plugins=plan.plugin_settings(),
        latency_trial=latency_trial,
        env=env,
        allow_outside_data=plan.allow_outside_data,
        trust_task_code=plan.trust_task_code,
        gpus_per_cell=plan.gpus_per_cell,
    )
    log_path = run_dir / "logs" / (cell_file_stem(cell.cell) + ".log")
    ctx = worker_context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker_main, args=(task, sender, str(log_path)), name=f"qbench-{cell.cell}")
    started = time.time()
    proc.start()
    sender.close()  # so the parent sees EOF when the worker dies
    phase, outcome, partial = "start", None, None
    deadline = time.monotonic() + plan.cell_timeout
    try:
        while outcome is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome = (
                    "error",
                    {
                        "phase": phase,
                        "error": (
                            f"timed out after {plan.cell_timeout:g}s during {phase}: raise --cell-timeout or use a "
                            f"smaller suite"
                        ),
                    },
                )
                break
            if receiver.poll(min(remaining, 0.5)):
                try:
                    kind, payload = receiver.recv()
                except (EOFError, OSError):
                    break
                if kind == "phase":
                    phase = payload
                    reporter.phase(cell.cell, payload)
                elif kind == "partial":  # what the finished phases measured, kept if the worker dies later
                    partial = payload
                else:
                    outcome = (kind, payload)
            elif not proc.is_alive() and not receiver.poll(0):
                break
    finally:
        receiver.close()
        timed_out = outcome is not None and outcome[0] == "error" and "timed out" in outcome[1]["error"]
        proc.join(timeout=0 if timed_out else 30)  # let a finished worker exit on its own
        _stop(proc)
    if outcome is None:
        code = proc.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (likely the OS out-of-memory killer)" if -code == signal.SIGKILL else ""
            why = f"worker killed by {name}{hint} during {phase}"
        else:
            why = f"worker exited with code {code} during {phase} without a result"
        outcome = ("error", {"phase": phase, "error": f"{why}; see {log_path}"})
    if outcome[0] == "error" and partial and not outcome[1].get("partial"):
        outcome = ("error", {**outcome[1], "partial": partial})
    return WorkerResult(outcome, started, log_path)


def worker_context():
    """Workers are forked from a fork server that imported torch and
    transformers once (qbench.execute.preload), where the OS has fork: each worker
    then starts in ~0.3 s instead of ~2.5 s, and is still a process of its
    own (its own memory, crash, allocator history). Elsewhere, spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["qbench.execute.preload"])
    return ctx


def start_worker_server() -> None:
    """Start the fork server now rather than at the first cell, so that its
    imports (torch, transformers: ~4.7 s on a 2-core CPU) overlap with the
    planning the main process does meanwhile (the tokenizer: ~5.8 s). Each
    worker is still given its environment explicitly (run_worker)."""
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def fresh_worker_server() -> None:
    """Stop the fork server so that the next worker starts a new one: a
    fresh process with its own address-space layout. Workers forked from one
    server share its layout, and latency follows it (one run's trials all
    fast, another's all slow), so each
    round of latency trials gets its own server and a cell's trials are as
    independent as separately started processes."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # private, in CPython since 3.8
    if stop is not None:
        stop()


def _stop(proc) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)
