"""A run from the user's options: everything that can be checked is checked
before any cell runs (the plan is written only then), an interrupted run is
found again, and the executor that runs the plan's workers is chosen."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from qbench.core.environment import resolve_device
from qbench.core.errors import QBenchError
from qbench.core.paths import results_dir
from qbench.data.suites import load_suite, suite_path
from qbench.execute.results import ResultStore, find_run, frame
from qbench.execute.runner import (
    DEFAULT_CELL_TIMEOUT,
    Reporter,
    RunPlan,
    SilentReporter,
    cast_notes,
    check_run_id,
    check_writable,
    default_baseline,
    execute,
    load_plan,
    new_run_id,
    plan_cells,
    save_plan,
)
from qbench.sdk.models import DEFAULT_MODEL, resolve_model
from qbench.sdk.registry import PluginSettings, get_backend, load_plugins

if TYPE_CHECKING:
    import pandas as pd


def create_run(
    model: str = DEFAULT_MODEL,
    suite: str = "default",
    backends: Optional[list[str]] = None,
    baseline: Optional[str] = None,
    device: str = "auto",
    threads: Optional[int] = None,
    cell_timeout: float = DEFAULT_CELL_TIMEOUT,
    plugin_dirs: tuple[str, ...] = (),
    output_dir: Optional[str] = None,
    trust_remote_code: bool = False,
    run_id: Optional[str] = None,
    allow_outside_data: bool = False,
    trust_task_code: bool = False,
    gpus: Optional[str] = None,
    gpus_per_cell: int = 1,
) -> tuple[RunPlan, Path]:
    """Validate everything that can be validated before any cell runs, and
    write the plan. Bad input fails here, with nothing measured yet.
    ``gpus``: ``"0,1"`` or ``"all"``, cells in parallel, one per GPU (or per
    ``gpus_per_cell`` GPUs, over which each cell's model is spread)."""
    check_options(threads, cell_timeout)
    if run_id is not None:
        check_run_id(run_id)
    device = resolve_device(device)
    baseline = baseline or default_baseline(device)
    gpu_ids = resolve_gpus(gpus, device, gpus_per_cell)
    settings = PluginSettings.from_env(plugin_dirs)
    loaded = load_plugins(settings)
    suite_file = suite_path(suite)
    suite_obj = load_suite(str(suite_file), allow_outside_data=allow_outside_data)
    # Rows named on the command line, else the suite's own (its default rows).
    try:
        cells, skipped = plan_cells(
            loaded,
            list(backends or suite_obj.backends or []),
            baseline,
            device,
            from_suite=not backends and bool(suite_obj.backends),
        )
    except QBenchError as exc:
        if backends or not suite_obj.backends:
            raise
        raise QBenchError(f"{suite_obj.file}: its backends list: {exc}") from None
    check_spread(loaded, cells, gpus_per_cell)
    check_calibration_sets(loaded, cells, suite_obj)
    spec = resolve_model(model, trust_remote_code=trust_remote_code)
    check_inputs(loaded, cells, spec.path, device)
    check_suite(suite_obj, spec.path, trust_remote_code, trust_task_code)
    root = Path(output_dir or results_dir())
    check_writable(
        root, "results folder", "choose another with -o/--output-dir (or $QBENCH_RESULTS), or fix its permissions"
    )
    run_id = run_id or new_run_id()
    run_dir = root / run_id
    try:  # created here, once: of two runs given one --run-id at once, the second is refused
        run_dir.mkdir()
    except FileExistsError:
        raise QBenchError(f"run folder {run_dir} already exists: pick another --run-id or use --resume") from None
    except OSError as exc:
        raise QBenchError(
            f"cannot create the run folder {run_dir} ({exc.strerror or exc}): choose another with "
            "-o/--output-dir (or $QBENCH_RESULTS), or fix its permissions"
        ) from None
    plan = RunPlan(
        run_id=run_id,
        created=time.time(),
        model=spec,
        suite_path=str(suite_file.resolve()),
        suite_name=suite_obj.name,
        suite_hash=suite_obj.content_hash(),
        device=device,
        threads=threads,
        cell_timeout=cell_timeout,
        plugin_dirs=list(settings.plugin_dirs),
        plugin_allow=list(settings.allow) if settings.allow is not None else None,
        plugin_block=list(settings.block),
        cells=cells,
        skipped=skipped,
        notes=cast_notes(loaded, cells, device),
        allow_outside_data=allow_outside_data,
        trust_task_code=trust_task_code,
        suite_files=suite_obj.data_hashes(),
        gpus=gpu_ids,
        gpus_per_cell=gpus_per_cell,
    )
    save_plan(plan, run_dir)
    return plan, run_dir


def resolve_gpus(spec: Optional[str], device: str, per_cell: int = 1) -> list[str]:
    """``--gpus`` and ``--gpus-per-cell``: the ``CUDA_VISIBLE_DEVICES`` value
    of each lane of workers: one GPU each, or groups of ``per_cell``.
    ``spec`` is ``all`` or indices among the GPUs this process sees; with
    ``per_cell`` > 1 and no ``spec``, the first ``per_cell`` GPUs."""
    if spec is None and per_cell == 1:
        return []
    option = "--gpus" if spec is not None else "--gpus-per-cell"
    if device != "cuda":
        raise QBenchError(
            f"{option} runs cells on GPUs, but the run's device is {device}: use --device cuda on a "
            f"machine with GPUs, or leave {option} out"
        )
    import torch

    count = torch.cuda.device_count()
    # Indices count the GPUs this process sees; a worker needs the names its parent's mask gives them.
    names = [n.strip() for n in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if n.strip()] or [
        str(i) for i in range(count)
    ]
    names = names[:count]
    if spec is None or spec.strip() == "all":
        chosen = names if spec is not None else names[:per_cell]
    else:
        try:
            wanted = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise QBenchError(f"--gpus takes 'all' or GPU indices like 0,1, not '{spec}'") from None
        if not wanted or len(set(wanted)) != len(wanted):
            raise QBenchError(f"--gpus '{spec}' names no GPU or one twice: give each index once, like 0,1")
        bad = [i for i in wanted if not 0 <= i < count]
        if bad:
            raise QBenchError(
                f"--gpus names GPU {bad[0]}, but this machine shows {count} (0-{count - 1}): see "
                "nvidia-smi, or use --gpus all"
            )
        chosen = [names[i] for i in wanted]
    if len(chosen) < per_cell:
        raise QBenchError(
            f"--gpus-per-cell {per_cell} needs {per_cell} GPUs, but the run has {len(chosen)}: "
            "lower it, or name more GPUs with --gpus"
        )
    if len(chosen) % per_cell:
        raise QBenchError(
            f"--gpus names {len(chosen)} GPUs, which do not split into groups of {per_cell} "
            "(--gpus-per-cell): name a multiple of it"
        )
    return [",".join(chosen[i : i + per_cell]) for i in range(0, len(chosen), per_cell)]


def check_spread(loaded, cells, gpus_per_cell: int) -> None:
    """``--gpus-per-cell`` needs backends whose load spreads a model over GPUs."""
    if gpus_per_cell == 1:
        return
    unable = sorted({c.backend for c in cells if not get_backend(loaded, c.backend).shards_across_gpus})
    if unable:
        able = sorted(name for name, b in loaded.backends.items() if b.shards_across_gpus)
        raise QBenchError(
            f"--gpus-per-cell {gpus_per_cell}: backend {unable[0]} cannot spread a model over GPUs "
            f"(those that can: {', '.join(able)}); run it in another run with one GPU per cell"
        )


def make_executor(
    kind: str = "local",
    address: Optional[str] = None,
    files: str = "auto",
    cache_dir: Optional[str] = None,
    cell_memory_gib: Optional[float] = None,
):
    """The executor that runs the plan's workers: this machine (one lane per
    GPU group of the plan), or a Ray cluster."""
    from qbench.execute.runner import LocalExecutor

    if kind == "local":
        return LocalExecutor()
    if kind != "ray":
        raise QBenchError(f"unknown executor '{kind}': use local or ray")
    from qbench.execute.ray_executor import RayExecutor

    if cache_dir and not address:  # a cluster started here: its nodes are this machine
        check_writable(
            Path(cache_dir).expanduser(), "shared artifact cache (--ray-cache)", "choose a folder you can write to"
        )
    return RayExecutor(
        address=address,
        files=files,
        cache_dir=cache_dir,
        task_memory=int(cell_memory_gib * 2**30) if cell_memory_gib else None,
    )


def check_lm_eval_tasks(suite, trust_task_code: bool) -> None:
    """The suite's lm-eval tasks, before any cell: lm-eval installed, task
    files readable and free of code unless trusted, installed task names known."""
    if not suite.lm_eval:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise QBenchError(
            f"{suite.file}: its lm_eval section needs lm-evaluation-harness: pip install 'qbench[lm-eval]'"
        ) from None
    from qbench.cell.lm_eval_engine import REGISTRY, task_specs

    task_specs(suite.lm_eval, suite, trust_task_code)
    names = [t[len(REGISTRY) :] for t in suite.lm_eval.tasks if t.startswith(REGISTRY)]
    if names:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise QBenchError(
                f"{suite.file}: lm-eval has no task '{unknown[0]}' (see `lm-eval ls tasks`), or "
                "give a task YAML file of your own"
            )


def check_inputs(loaded, cells, model_path: str, device: str) -> None:
    """Each runnable cell's own inputs (a prequantized file's path, type and
    vocabulary), before the baseline spends minutes."""
    for cell in cells:
        backend = get_backend(loaded, cell.backend)
        config = backend.config_for(cell.variant, cell.settings)
        if backend.variant_available(config, device).ok:
            try:
                backend.check_inputs(config, Path(model_path))
            except QBenchError as exc:
                raise QBenchError(f"{cell.cell}: {exc}") from None


def check_suite(suite, model_path: str, trust_remote_code: bool = False, trust_task_code: bool = False) -> None:
    """Every check of a suite that planning makes, in one place, so that
    `qbench suites validate` and `qbench run` agree: its data read as the
    cells will read it, tokenized with the run's tokenizer and checked
    against the model's positions, and its lm-eval tasks."""
    check_workload(suite, model_path, trust_remote_code)
    check_lm_eval_tasks(suite, trust_task_code)


def check_calibration_sets(loaded, cells, suite) -> None:
    """``calibration=NAME`` names a set of the suite, on a variant that calibrates."""
    for cell in cells:
        backend = get_backend(loaded, cell.backend)
        config = backend.config_for(cell.variant, cell.settings)
        if config.calibration == "default":
            continue
        if not backend.needs_calibration(config):
            raise QBenchError(
                f"{cell.cell}: this variant does not calibrate, so calibration={config.calibration} "
                "would change nothing: use it with a calibrating variant (gptq, torchao int8-static)"
            )
        suite.calibration_spec(config.calibration)


def check_options(threads: Optional[int], cell_timeout: float) -> None:
    """Numbers that would otherwise be taken silently (threads 0 meant
    torch's default) or saved into a plan that can no longer be loaded
    (a NaN timeout)."""
    if threads is not None and threads < 1:
        raise QBenchError(f"--threads must be at least 1, got {threads} (leave it out for torch's default)")
    if not isinstance(cell_timeout, (int, float)) or not math.isfinite(cell_timeout) or cell_timeout <= 0:
        raise QBenchError(f"--cell-timeout must be a positive number of seconds, got {cell_timeout}")


def check_workload(suite, model_path: str, trust_remote_code: bool) -> None:
    """Tokenize the suite with the run's tokenizer and check it against the
    model before any cell runs (see Workload.check)."""
    from qbench.data.workload import Workload, max_positions
    from qbench.sdk.hf import load_tokenizer

    work = Workload(suite, load_tokenizer(model_path, trust_remote_code))
    work.check(max_positions(model_path))


def resume_run(run: str, output_dir: Optional[str] = None) -> tuple[RunPlan, Path]:
    """The plan and folder of an interrupted run (an id under ``output_dir``
    or the results folder, or a run folder's path), checked against today's
    suite and machine."""
    run_dir = find_run(run, output_dir)
    plan = load_plan(run_dir)
    current = load_suite(plan.suite_path, allow_outside_data=plan.allow_outside_data).content_hash()
    if current != plan.suite_hash:
        raise QBenchError(
            f"suite {plan.suite_path} changed since run {plan.run_id} started "
            f"(hash {current} != {plan.suite_hash}): start a new run"
        )
    if plan.device == "cuda":
        resolve_device("cuda")  # its cells were planned for a GPU: refuse to resume without one
    return plan, run_dir


def run(
    model: str = DEFAULT_MODEL,
    suite: str = "default",
    backends: Optional[list[str]] = None,
    reporter: Reporter = SilentReporter(),
    **options,
) -> pd.DataFrame:
    """Run a benchmark and return its comparison table (one row per cell).

    ``qbench.run(backends=["fp"], suite="smoke")``; options as ``create_run``."""
    plan, run_dir = create_run(model=model, suite=suite, backends=backends, **options)
    execute(plan, run_dir, reporter)
    df = frame(ResultStore(run_dir).latest().values())
    df.attrs["run_dir"] = str(run_dir)
    return df
