"""The Python API: what the CLI does, for notebooks and scripts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import pandas as pd

from qbench.environment import resolve_device
from qbench.errors import QBenchError
from qbench.models import DEFAULT_MODEL, resolve_model
from qbench.paths import results_dir
from qbench.plugins import PluginSettings, load_plugins
from qbench.results import ResultStore, find_run, frame
from qbench.results import load_results as load_results  # re-exported
from qbench.runner import (DEFAULT_BASELINE, DEFAULT_CELL_TIMEOUT, RunPlan, Reporter, SilentReporter, execute,
                           load_plan, new_run_id, plan_cells, save_plan)
from qbench.suites import load_suite, suite_path


def create_run(
    model: str = DEFAULT_MODEL,
    suite: str = "default",
    backends: Optional[list[str]] = None,
    baseline: str = DEFAULT_BASELINE,
    device: str = "auto",
    threads: Optional[int] = None,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    plugin_dirs: tuple[str, ...] = (),
    output_dir: Optional[str] = None,
    trust_remote_code: bool = False,
    run_id: Optional[str] = None,
) -> tuple[RunPlan, Path]:
    """Validate everything that can be validated before any cell runs, and
    write the plan. Bad input fails here, with nothing measured yet."""
    device = resolve_device(device)
    settings = PluginSettings.from_env(plugin_dirs)
    loaded = load_plugins(settings)
    suite_file = suite_path(suite)
    suite_obj = load_suite(str(suite_file))
    cells, skipped = plan_cells(loaded, list(backends or []), baseline, device)
    spec = resolve_model(model, trust_remote_code=trust_remote_code)
    run_id = run_id or new_run_id()
    run_dir = Path(output_dir or results_dir()) / run_id
    if run_dir.exists():
        raise QBenchError(f"run folder {run_dir} already exists: pick another --run-id or use --resume")
    plan = RunPlan(run_id=run_id, created=time.time(), model=spec, suite_path=str(suite_file.resolve()),
                   suite_name=suite_obj.name, suite_hash=suite_obj.content_hash(), device=device,
                   threads=threads, cell_timeout=cell_timeout, plugin_dirs=list(settings.plugin_dirs),
                   plugin_allow=list(settings.allow) if settings.allow is not None else None,
                   plugin_block=list(settings.block), cells=cells, skipped=skipped)
    save_plan(plan, run_dir)
    return plan, run_dir


def resume_run(run: str, retry_failed: bool = False) -> tuple[RunPlan, Path]:
    run_dir = find_run(run)
    plan = load_plan(run_dir)
    current = load_suite(plan.suite_path).content_hash()
    if current != plan.suite_hash:
        raise QBenchError(f"suite {plan.suite_path} changed since run {plan.run_id} started "
                          f"(hash {current} != {plan.suite_hash}): start a new run")
    return plan, run_dir


def run(model: str = DEFAULT_MODEL, suite: str = "default", backends: Optional[list[str]] = None,
        reporter: Reporter = SilentReporter(), **options) -> pd.DataFrame:
    """Run a benchmark and return its comparison table (one row per cell).

    ``qbench.run(backends=["fp"], suite="smoke")``; options as ``create_run``."""
    plan, run_dir = create_run(model=model, suite=suite, backends=backends, **options)
    execute(plan, run_dir, reporter)
    df = frame(ResultStore(run_dir).latest().values())
    df.attrs["run_dir"] = str(run_dir)
    return df


__all__ = ["run", "create_run", "resume_run", "load_results", "find_run"]
