"""The `qbench` command."""

from __future__ import annotations

import errno
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table
from rich.text import Text

from qbench.core.errors import QBenchError
from qbench.core.io import write_atomic
from qbench.core.processes import quiet_library_logs

console = Console(stderr=True, soft_wrap=True)  # messages never wrap mid-word in logs
# Piped output (CI logs, files) gets a wide table instead of an 80-column wrap.
out = Console(width=None if sys.stdout.isatty() else 250)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class RichReporter:
    """Progress for long runs: which cells run, their phases, elapsed time.
    Several cells at once with ``--gpus``: one status line lists them all."""

    def __init__(self) -> None:
        self.status: Optional[Status] = None
        self.running: dict[str, list] = {}  # key -> [label, started, phase]
        self.expected: dict[str, float] = {}  # worker label -> seconds, from the estimate
        self.started = time.monotonic()

    def expect(self, estimate) -> None:
        """Each worker's expected seconds (qbench.execute.estimate.Estimate), for the ETA."""
        self.expected = dict(estimate.workers)
        self.started = time.monotonic()

    def _left(self) -> Optional[float]:
        """Seconds the run has left by the estimate: workers not finished,
        those running counted for what they have left (at least 0)."""
        # Copies: the spinner's thread renders while the main thread updates.
        expected, running = dict(self.expected), dict(self.running)
        if not expected:
            return None
        now = time.monotonic()
        return sum(
            max(seconds - (now - running[k][1]), 0.0) if k in running else seconds for k, seconds in expected.items()
        )

    def _eta(self) -> str:
        left = self._left()
        run = f"run {_duration(time.monotonic() - self.started)} in"
        return run + (f", about {_duration(left)} left" if left is not None else "")

    def cell_started(self, cell: str, index: int, total: int) -> None:
        # cell names and errors are user text: never markup
        self.running[cell] = [escape(f"[{index}/{total}] {cell}"), time.monotonic(), "starting worker"]
        self._show()

    def _entry(self, cell: str) -> Optional[list]:
        # a latency trial is reported as "CELL · latency trial k of K", its phases as CELL
        return self.running.get(cell) or next(
            (entry for key, entry in self.running.items() if key.startswith(cell + " · ")), None
        )

    def phase(self, cell: str, name: str) -> None:
        entry = self._entry(cell)
        if entry is not None:
            entry[2] = escape(name)
            self._show()

    def cell_finished(self, cell: str, status: str, seconds: float, error: Optional[str]) -> None:
        entry = self.running.pop(cell, None)
        expected = self.expected.pop(cell, None)
        label = entry[0] if entry else escape(cell)
        self._show()
        took = f"{seconds:.0f}s" + (f" (expected {expected:.0f}s)" if expected is not None else "")
        if status == "ok":
            console.print(f"[green]✓[/] {label} finished in {took}; {self._eta()}")
        else:
            console.print(f"[red]✗[/] {label} failed after {took}: {escape(error or '?')}; {self._eta()}")

    def __rich__(self) -> Text:
        """The status line, rendered anew at each refresh of the spinner: the
        seconds and the ETA move between a worker's events."""
        now, expected = time.monotonic(), dict(self.expected)
        text = "  |  ".join(
            f"{label} · {phase} · {now - started:.0f}s" + (f" of about {expected[key]:.0f}s" if key in expected else "")
            for key, (label, started, phase) in dict(self.running).items()
        )
        return Text.from_markup(text + "  |  " + escape(self._eta()))

    def _show(self) -> None:
        if not self.running:
            if self.status is not None:
                self.status.stop()
                self.status = None
            return
        if self.status is None:
            self.status = console.status(self, refresh_per_second=2)
            self.status.start()

    def warn(self, message: str) -> None:
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def print_table(records, title: str, metrics: str | None = None) -> None:
    from qbench.present.table import table_rows

    headers, rows = table_rows(records, metrics)
    table = Table(title=escape(title), show_lines=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
    for row in rows:
        table.add_row(*map(escape, row), style="red" if row[1].startswith("FAILED") else None)
    out.print(table)
    for record in records:
        for note in record.notes:
            out.print(f"[yellow]note[/] {escape(record.cell)}: {escape(note)}", highlight=False)


METRICS_HELP = (
    "The comparison table's columns, comma-separated: a record's metric (kld, word_perplexity, "
    "bits_per_byte, byte_perplexity, ...) or a task's, TASK/METRIC (lm_eval:arc_easy/acc_norm). Each "
    "with a leading + joins the default columns: --metrics +word_perplexity,+bits_per_byte."
)


def _finite(ctx, param, value):
    """Click's FloatRange lets NaN through (every comparison with NaN is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@click.group()
@click.version_option(package_name="qbench")
def cli() -> None:
    """Benchmark quantization backends on the same tokens: quality and cost in one run."""


@cli.command()
@click.option(
    "--model",
    "-m",
    default="smollm2-135m",
    show_default=True,
    help="Local HF folder, hub id, or smollm2-135m (the embedded default).",
)
@click.option("--suite", "-s", default="default", show_default=True, help="Suite name (suites/) or YAML file.")
@click.option(
    "--backends",
    "-b",
    multiple=True,
    help="Backends or cells: 'fp', 'fp:bf16', 'rtn:bits=4,group_size=32'. Comma-separated or "
    "repeated; 'all': every variant available here. Default: the suite's rows (its backends: "
    "list), else all.",
)
@click.option(
    "--baseline", default=None, help="The reference cell, run first. Default: fp:fp32 on the CPU, fp:bf16 on CUDA."
)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch threads per worker (default: torch's)."
)
@click.option(
    "--cell-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3600,
    show_default=True,
    callback=_finite,
    help="Seconds before a cell is killed.",
)
@click.option(
    "--plugins-dir",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Folder of one-off plugin .py files (also $QBENCH_PLUGINS_DIR).",
)
@click.option("--output-dir", "-o", default=None, help="Where run folders go (default: results/ or $QBENCH_RESULTS).")
@click.option("--run-id", default=None, help="Name of the run folder (default: a timestamp).")
@click.option(
    "--resume", "resume", default=None, metavar="RUN", help="Finish an interrupted run; skips finished cells."
)
@click.option("--retry-failed", is_flag=True, help="With --resume, run failed cells again too.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
@click.option(
    "--allow-outside-data",
    is_flag=True,
    help="Let the suite read data files outside its own folder (off: a shared suite cannot read your files).",
)
@click.option(
    "--trust-task-code",
    is_flag=True,
    help="Let the suite's lm-eval task files run Python ('!function', datasets' trust_remote_code).",
)
@click.option(
    "--gpus",
    default=None,
    metavar="all|0,1,...",
    help="Run cells in parallel, one worker per GPU (the baseline first, alone). Needs --device cuda.",
)
@click.option(
    "--gpus-per-cell",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Spread each cell's model over N GPUs (a model larger than one GPU). Needs --device cuda.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where cells run: this machine, or a Ray cluster (pip install 'qbench[ray]').",
)
@click.option(
    "--address",
    default=None,
    metavar="ADDR",
    help="With --executor ray: the cluster (e.g. ray://head:10001 or auto); default: start one here.",
)
@click.option(
    "--ray-files",
    type=click.Choice(["auto", "shared", "ship"]),
    default="auto",
    show_default=True,
    help="With --executor ray: nodes read the model, suite and run folder from shared storage, or get "
    "them through Ray's object store (auto: ship models under 4 GiB to a remote cluster).",
)
@click.option(
    "--ray-cache",
    default=None,
    metavar="DIR",
    help="With --executor ray: an artifact cache every node shares (default: each node's own).",
)
@click.option(
    "--cell-memory",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="GIB",
    callback=_finite,
    help="With --executor ray: memory each cell's task reserves on its node.",
)
@click.pass_context
def run(
    ctx,
    model,
    suite,
    backends,
    baseline,
    device,
    threads,
    cell_timeout,
    plugins_dir,
    output_dir,
    run_id,
    resume,
    retry_failed,
    trust_remote_code,
    allow_outside_data,
    trust_task_code,
    gpus,
    gpus_per_cell,
    executor,
    address,
    ray_files,
    ray_cache,
    cell_memory,
) -> None:
    """Run a benchmark: every backend variant against the baseline."""
    from qbench.execute.results import run_lock
    from qbench.execute.runs import create_run, make_executor, resume_run

    if executor != "ray":
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("address", "ray_files", "ray_cache", "cell_memory")
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise QBenchError(f"{', '.join(given)} only apply with --executor ray")
    elif gpus is not None:
        raise QBenchError(
            "--gpus picks this machine's GPUs for its own workers; with --executor ray, Ray places "
            "each cell on a GPU of its cluster: drop --gpus (limit a local cluster's GPUs with "
            "CUDA_VISIBLE_DEVICES)"
        )

    # before the plan: an executor that cannot start leaves no run folder behind
    runner = make_executor(executor, address=address, files=ray_files, cache_dir=ray_cache, cell_memory_gib=cell_memory)
    if executor == "local":
        from qbench.execute.runner import start_worker_server

        start_worker_server()  # its imports overlap with the planning below
    if resume:
        given = [
            f"--{name.replace('_', '-')}"
            for name in RUN_PLAN_OPTIONS
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise QBenchError(
                f"--resume continues run {resume} with the options it was planned with: drop "
                f"{', '.join(given)} (or start a new run with them)"
            )
        plan, run_dir = resume_run(resume, output_dir)
    else:
        if retry_failed:
            raise QBenchError("--retry-failed only makes sense with --resume RUN")
        with console.status("resolving the model and planning the run"):
            plan, run_dir = create_run(
                model=model,
                suite=suite,
                backends=list(backends),
                baseline=baseline,
                device=device,
                threads=threads,
                cell_timeout=cell_timeout,
                plugin_dirs=tuple(plugins_dir),
                output_dir=output_dir,
                trust_remote_code=trust_remote_code,
                run_id=run_id,
                allow_outside_data=allow_outside_data,
                trust_task_code=trust_task_code,
                gpus=gpus,
                gpus_per_cell=gpus_per_cell,
            )
    with run_lock(run_dir):  # one process measures a run at a time; the second is told who holds it
        _run_locked(plan, run_dir, runner, retry_failed, executor, address)


def _run_locked(plan, run_dir: Path, runner, retry_failed: bool, executor: str, address) -> None:
    from qbench.execute.results import ResultStore
    from qbench.execute.runner import execute, pending_cells, preflight, skipped_summary

    store = ResultStore(run_dir)
    reporter = RichReporter()
    preflight(run_dir, store, reporter)  # a torn tail or records saved aside change what is left to run
    todo = pending_cells(plan, store, retry_failed)
    console.print(
        escape(
            f"run {plan.run_id} → {run_dir.resolve()}  model {plan.model.name} "
            f"({plan.model.fingerprint}) suite {plan.suite_name} ({plan.suite_hash}) device {plan.device}"
            + (f" on GPUs {','.join(plan.gpus)}" if plan.gpus else "")
            + (f" on Ray ({address or 'a cluster on this machine'})" if executor == "ray" else "")
        )
    )
    left_out = skipped_summary(plan.skipped)
    if left_out:
        console.print(f"[yellow]skipped[/] {escape(left_out)}")
    for cell, note in plan.notes.items():
        console.print(f"[yellow]note[/] {escape(cell)}: {escape(note)}")
    if len(todo) < len(plan.cells):
        console.print(f"{len(plan.cells) - len(todo)} cell(s) already finished; running {len(todo)}")
    _print_estimate(plan, run_dir, todo, reporter)
    try:
        execute(plan, run_dir, reporter, retry_failed=retry_failed, executor=runner)
    finally:
        runner.close()
    records = list(store.latest().values())
    print_table(records, f"qbench run {plan.run_id}")
    console.print(f"results: {escape(str(store.path.resolve()))}")
    if any(r.ok for r in records):
        from qbench.present.report import write_report

        md, page = write_report(run_dir)
        console.print(escape(f"report: {md.resolve()} and {page.resolve()}"))
    failed = [r for r in records if not r.ok]
    if failed:
        console.print(
            f"[red]{len(failed)} cell(s) failed[/]; finished cells are kept. "
            f"Rerun them with: qbench run --resume {escape(plan.run_id)} --retry-failed"
        )
        sys.exit(1)


#: Options a resumed run takes from its plan, never from the command line.
RUN_PLAN_OPTIONS = (
    "model",
    "suite",
    "backends",
    "baseline",
    "device",
    "threads",
    "cell_timeout",
    "plugins_dir",
    "run_id",
    "trust_remote_code",
    "allow_outside_data",
    "trust_task_code",
    "gpus",
    "gpus_per_cell",
)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--plugins-dir", multiple=True, type=click.Path(file_okay=False))
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Every setting of every variant (default: those that differ from the backend's defaults).",
)
def backends(as_json, device, plugins_dir, verbose) -> None:
    """List backends and variants, and whether each can run here (and why not)."""
    from qbench.core.environment import resolve_device
    from qbench.sdk.registry import PluginSettings, load_plugins

    device = resolve_device(device)
    settings = PluginSettings.from_env(tuple(plugins_dir))
    loaded = load_plugins(settings)
    if not loaded.backends:
        why = (
            f"QBENCH_PLUGINS={','.join(settings.allow)!r} allows none of the installed ones"
            if settings.allow is not None
            else "no installed plugin registered one"
        )
        raise QBenchError(
            f"no backends loaded ({why}): unset QBENCH_PLUGINS or set it to 'builtin', or reinstall qbench"
        )
    entries = []
    for name, backend in sorted(loaded.backends.items()):
        availability = backend.available(device)
        variants = []
        for vname, config in backend.variants().items():
            v_av = backend.variant_available(config, device) if availability.ok else availability
            variants.append(
                {
                    "name": vname,
                    "available": v_av.ok,
                    "reason": v_av.reason,
                    "settings": config.settings(),
                    "nominal_bits": config.nominal_bits(),
                }
            )
        entries.append(
            {
                "backend": name,
                "description": backend.description,
                "plugin": loaded.origin[name],
                "version": backend.version() if availability.ok else None,
                "available": availability.ok,
                "reason": availability.reason,
                "device": device,
                "settings_schema": backend.config_class.model_json_schema().get("properties", {}),
                "kv_caches": dict(backend.kv_caches),
                "variants": variants,
            }
        )
    if as_json:
        click.echo(json.dumps(entries, indent=1))
        return
    title = f"qbench backends (device: {device})" + (
        "" if verbose else "; a backend's row holds the settings all its variants share"
    )
    table = Table(title=title)
    for column in ("backend", "variant", "here?", "settings"):
        table.add_column(column, overflow="fold")

    def listed(settings: dict) -> str:
        return escape(", ".join(f"{k}={val}" for k, val in settings.items()))

    for e in entries:
        shared = (
            {}
            if verbose or not e["variants"]
            else {
                k: val
                for k, val in e["variants"][0]["settings"].items()
                if all(v["settings"].get(k) == val for v in e["variants"])
            }
        )
        # the backend's description, version and plugin once; a reason the whole backend shares, once
        table.add_row(
            f"[bold]{escape(e['backend'])}[/]",
            "",
            "" if e["available"] else f"[red]no[/]: {escape(e['reason'])}",
            escape(f"{e['description']} ({e['version'] or 'not installed'}; {e['plugin']})")
            + (f"\nall variants: {listed(shared)}" if shared else "")
            + (f"\nkv_cache: {escape(', '.join(e['kv_caches']))}" if len(e["kv_caches"]) > 1 else ""),
        )
        for v in e["variants"]:
            here = (
                "[green]yes[/]"
                if v["available"]
                else "[red]no[/]"
                if not e["available"]
                else f"[red]no[/]: {escape(v['reason'])}"
            )
            table.add_row(
                "", escape(v["name"]), here, listed({k: val for k, val in v["settings"].items() if k not in shared})
            )
        table.add_section()
    out.print(table)


@cli.command()
@click.option(
    "--backend",
    "-b",
    "variant",
    required=True,
    metavar="BACKEND:VARIANT",
    help="The variant whose units are measured, e.g. torchao:int4-wo-g32.",
)
@click.option("--model", "-m", default="smollm2-135m", show_default=True)
@click.option("--suite", "-s", default="default", show_default=True, help="Its perplexity windows are scored.")
@click.option(
    "--unit",
    type=click.Choice(["layer", "type", "block"]),
    default="type",
    show_default=True,
    help="A linear layer, a layer type across blocks (*.down_proj), or a decoder block.",
)
@click.option("--converse", is_flag=True, help="Quantize everything but the unit (which unit helps most when kept).")
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Scored tokens per unit (the suite's first windows).",
)
@click.option(
    "--recipe",
    "recipe_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write a mixed-precision recipe: the variant with its --top most harmful units kept in "
    "full precision (or quantized as --use).",
)
@click.option("--force", "force_recipe", is_flag=True, help="Let --recipe replace an existing file.")
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True, help="Units the --recipe upgrades.")
@click.option(
    "--use",
    default=None,
    metavar="VARIANT",
    help="What --recipe makes of those units (another variant of the backend); default: full precision.",
)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--output-dir", "-o", default=None, help="Where the folder goes (default: results/ or $QBENCH_RESULTS).")
@click.option("--run-id", default=None, help="Folder name; rerun with the same one to finish an interrupted pass.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub (off by default).")
def sensitivity(
    variant,
    model,
    suite,
    unit,
    converse,
    tokens,
    recipe_path,
    force_recipe,
    top,
    use,
    device,
    output_dir,
    run_id,
    trust_remote_code,
) -> None:
    """Which units hurt most when quantized: KLD and top-1 agreement per unit."""
    from qbench.analyze.sensitivity_run import recipe_from_sensitivity
    from qbench.analyze.sensitivity_run import run_sensitivity as measure
    from qbench.execute.results import check_output

    if recipe_path:
        check_output(recipe_path, force_recipe, "--force")  # before minutes of measuring, not after

    def progress(row, done, total) -> None:
        console.print(
            f"[{done}/{total}] {escape(row.unit)}: KLD {row.kld.value:.5f} ± {row.kld.stderr or 0:.5f}, "
            f"same top {100 * row.same_top_p.value:.1f}% ({row.seconds:.1f} s)",
            highlight=False,
        )

    table, folder = measure(
        variant,
        model=model,
        suite=suite,
        unit=unit,
        mode="all-but" if converse else "only",
        device=device,
        max_tokens=tokens,
        output_dir=output_dir,
        run_id=run_id,
        trust_remote_code=trust_remote_code,
        on_row=progress,
    )
    rich_table = Table(
        title=f"{variant}: {'all but ' if converse else ''}one {unit} at a time, most harmful first ({folder})"
    )
    for column in ("unit", "layers", "KLD", "same top %", "ln(PPL/base)"):
        rich_table.add_column(column, justify="left" if column == "unit" else "right")
    for row in table.itertuples():
        rich_table.add_row(
            escape(row.unit),
            str(row.layers),
            f"{row.kld:.5f} ± {row.kld_stderr or 0:.5f}",
            f"{100 * row.same_top_p:.1f}",
            f"{row.ln_ppl_ratio:+.4f}",
        )
    console.print(rich_table)
    if recipe_path:
        written = recipe_from_sensitivity(folder, variant, top, use, recipe_path, force_recipe)
        from qbench.core.cells import CellSpec

        backend = CellSpec.parse(variant).backend
        console.print(
            f"recipe written: {escape(str(written))} (run it with -b {escape(backend)}:recipe={escape(str(written))})",
            highlight=False,
        )


@cli.command()
@click.option(
    "--budget",
    required=True,
    metavar="BUDGET",
    help='"kld<=0.05", "acc>=0.99*base", "acc>=0.7", "weights<=150MiB" or "memory@8192<=600MiB" (weights plus '
    "one sequence's KV cache of 8192 tokens). A quality bound must hold at "
    "the error bar (95%), not just the point estimate.",
)
@click.option(
    "--backends",
    "-b",
    multiple=True,
    metavar="SPEC",
    help="The uniform variants to try, as for `qbench run` (default: every one `qbench run` plans here).",
)
@click.option("--model", "-m", default="smollm2-135m", show_default=True)
@click.option(
    "--suite",
    "-s",
    default="default",
    show_default=True,
    help="Its perplexity (and, for an acc budget, task) sections are used.",
)
@click.option(
    "--base",
    default=None,
    metavar="VARIANT",
    help="The torchao variant mixed recipes start from (default: chosen from the uniform results).",
)
@click.option(
    "--unit",
    type=click.Choice(["layer", "type", "block"]),
    default="type",
    show_default=True,
    help="What a recipe upgrades, ranked by sensitivity.",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Scored tokens per unit in the sensitivity pass.",
)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--output-dir", "-o", default=None, help="Where the folder goes (default: results/ or $QBENCH_RESULTS).")
@click.option("--run-id", default=None, help="Folder name; rerun with the same one to finish an interrupted search.")
def search(budget, backends, model, suite, base, unit, tokens, device, output_dir, run_id) -> None:
    """The smallest configuration that meets a quality budget (or the best within a size)."""
    from qbench.analyze.search import describe
    from qbench.metrics.registry import Z
    from qbench.present.publish import search as run_search

    result = run_search(
        budget,
        list(backends) or None,
        model,
        suite,
        device,
        unit,
        tokens,
        base,
        output_dir,
        run_id,
        RichReporter(),
        on_step=lambda message: console.print(escape(message), highlight=False),
    )
    table = Table(title=f"qbench search {result.budget.text}: every configuration tried ({result.folder})")
    for column in ("configuration", "weights MiB", "KLD ± 95%", "acc ± 95%", "at the error bar", "meets"):
        table.add_column(column, justify="left" if column == "configuration" else "right", overflow="fold")
    for v in result.path:
        name = v.cell if v.kind == "uniform" else f"{v.cell} (k={v.k})"
        table.add_row(
            escape(name),
            f"{v.weight_bytes / 2**20:.1f}" if v.weight_bytes else "-",
            f"{v.kld:.5f} ± {Z * (v.kld_stderr or 0):.5f}" if v.kld is not None else "-",
            f"{v.acc:.4f} ± {Z * (v.acc_stderr or 0):.4f}" if v.acc is not None else "-",
            f"{v.at_error_bar:.5g}" if v.at_error_bar is not None else escape(v.error or "-"),
            "[green]yes[/]" if v.meets else "[red]no[/]",
        )
    console.print(table)
    cost = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.seconds.items())
    console.print(f"search cost: {cost}", highlight=False)
    if result.chosen is None:
        console.print(f"[red]nothing meets {escape(result.budget.text)}[/]: {escape(result.why)}")
        raise SystemExit(1)
    console.print(
        f"[green]chosen[/]: {escape(describe(result.chosen, result.budget))}; {escape(result.why)}", highlight=False
    )


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON lines.")
@click.option("--markdown", is_flag=True, help="Print a GitHub-ready markdown table.")
@click.option("--metrics", help=METRICS_HELP)
def show(run_id, as_json, markdown, metrics) -> None:
    """Print the comparison table of a run."""
    from qbench.execute.results import ResultStore, find_run
    from qbench.execute.runner import load_plan
    from qbench.present.table import markdown_table

    run_dir = find_run(run_id)
    plan = load_plan(run_dir)
    records = list(ResultStore(run_dir).latest().values())
    if as_json:
        for r in records:
            click.echo(r.to_json())
        return
    if markdown:
        click.echo(markdown_table(records, metrics))
        return
    print_table(records, f"qbench run {plan.run_id}: {plan.model.name} on suite {plan.suite_name}", metrics)
    unfinished = [c.cell for c in plan.cells if c.cell not in {r.cell for r in records}]
    if unfinished:
        console.print(
            f"[yellow]not run yet[/]: {escape(', '.join(unfinished))} (qbench run --resume {escape(plan.run_id)})"
        )


def _print_estimate(plan, run_dir: Path, todo, reporter: RichReporter) -> None:
    """The run's expected time before it starts (artifact builds included),
    and each worker's expected time for the progress display."""
    from qbench.cell.artifacts import is_cached
    from qbench.data.suites import load_suite
    from qbench.execute.estimate import estimate, past_costs

    costs = past_costs(run_dir.parent, plan.model.fingerprint, plan.suite_hash, plan.device, warn=reporter.warn)
    latency = load_suite(plan.suite_path, allow_outside_data=plan.allow_outside_data).latency
    found = estimate([(c.cell, c.backend) for c in todo], costs, latency.trials if latency else 1, is_cached)
    if found is None:
        console.print(
            f"time estimate: none yet ({len(todo)} cell(s), no earlier run of this model, suite and "
            "device in the results folder)"
        )
        return
    reporter.expect(found)
    parts = [f"about {_duration(found.seconds)} for {len(todo)} cell(s), from earlier runs"]
    builds = {cell: seconds for cell, seconds in found.builds.items() if seconds >= 1}  # not a dtype cast's
    if builds:
        parts.append(
            f"{_duration(sum(builds.values()))} of it building {len(builds)} artifact(s) not in the "
            f"cache ({', '.join(builds)})"
        )
    if found.unknown:
        parts.append(
            f"{len(found.unknown)} cell(s) never run here counted as a typical one, their artifact builds not counted"
        )
    console.print(escape("time estimate: " + "; ".join(parts)))


@cli.command()
@click.argument("run_id")
@click.option(
    "--kld-budget",
    type=click.FloatRange(min=0),
    default=0.02,
    show_default=True,
    callback=_finite,
    help="Quality budget of the recommendation: the largest acceptable mean KLD.",
)
@click.option("--metrics", help=METRICS_HELP)
def report(run_id, kld_budget, metrics) -> None:
    """Write report.md and a self-contained report.html into the run folder."""
    from qbench.execute.results import find_run
    from qbench.present.report import write_report

    md, page = write_report(find_run(run_id), kld_budget, metrics)
    console.print(escape(f"wrote {md} and {page}"))


@cli.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--markdown", is_flag=True, help="Print a markdown table.")
@click.option(
    "--allow-suite-change",
    is_flag=True,
    help="Compare runs of different suites anyway (their quality figures measure different things).",
)
def compare(run_a, run_b, markdown, allow_suite_change) -> None:
    """The same cells in two runs: which figures changed beyond their error bars.

    Exits 1 when something did."""
    from qbench.execute.results import ResultStore, find_run
    from qbench.execute.runner import load_plan
    from qbench.present.compare import ALPHA, compare_records, latency_spread, pooled_trial_spread, unmatched
    from qbench.present.table import markdown_rows

    dir_a, dir_b = find_run(run_a), find_run(run_b)
    plan_a, plan_b = load_plan(dir_a), load_plan(dir_b)
    if plan_a.suite_hash != plan_b.suite_hash:
        what = f"suite '{plan_a.suite_name}' ({plan_a.suite_hash}) vs '{plan_b.suite_name}' ({plan_b.suite_hash})"
        if not allow_suite_change:
            raise QBenchError(
                f"runs {run_a} and {run_b} used different suites ({what}): their accuracy and "
                "perplexity measure different data; pass --allow-suite-change to compare anyway"
            )
        RichReporter().warn(f"different suites ({what}): quality figures are not comparable")
    if plan_a.model.fingerprint != plan_b.model.fingerprint:
        RichReporter().warn(
            f"different models ({plan_a.model.name} {plan_a.model.fingerprint} vs "
            f"{plan_b.model.name} {plan_b.model.fingerprint}): changes include the model's"
        )
    a = ResultStore(dir_a).latest()
    b = ResultStore(dir_b).latest()
    headers, rows, flagged = compare_records(a, b)
    if not rows:
        raise QBenchError(f"runs {run_a} and {run_b} share no finished cells to compare")
    if markdown:
        click.echo("\n".join(markdown_rows(headers, rows)))
    else:
        table = Table(
            title=escape(
                f"{run_a} (A) vs {run_b} (B): changes flagged at a family-wise error rate of {ALPHA:.0%} (Holm)"
            )
        )
        for h in headers:
            table.add_column(h)
        for row in rows:
            table.add_row(*map(escape, row), style="red" if row[-1] == "YES" else None)
        out.print(table)
    for line in unmatched(a, b):
        console.print(f"[yellow]not compared[/]: {escape(line)}")
    for label, records in (("A", a), ("B", b)):
        spread = pooled_trial_spread(records, "decode_ms_per_token")
        if spread is not None:
            console.print(
                f"run {label}: decode latency differs by ±{spread:.1%} (SD) between worker processes of the same cell"
            )
    shift = latency_spread(a, b)
    if shift:
        console.print(
            f"latency ratios B/A across {shift[2]} figures: median {math.exp(shift[1]) - 1:+.1%} "
            f"(a shift common to every cell), robust SD ±{shift[0]:.1%}"
        )
    console.print(f"{flagged} change(s) beyond noise" if flagged else "no change beyond noise")
    sys.exit(1 if flagged else 0)


@cli.command()
@click.argument("run_id")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the tidy table as CSV.")
@click.option("--parquet", "parquet_path", type=click.Path(dir_okay=False), help="Write it as Parquet.")
@click.option("--force", is_flag=True, help="Replace an existing file (never one of a run folder's own files).")
def export(run_id, csv_path, parquet_path, force) -> None:
    """Export a run's tidy results (one row per cell and metric, with unit, n
    and standard error). Default: results.csv and results.parquet in the run
    folder (views of its records, replaced on every export)."""
    from qbench.execute.results import ResultStore, check_output, find_run, tidy

    run_dir = find_run(run_id)
    df = tidy(ResultStore(run_dir).latest().values())
    if not csv_path and not parquet_path:
        csv_path, parquet_path, force = run_dir / "results.csv", run_dir / "results.parquet", True
    # every target checked before anything is written: a refusal leaves no half-export behind
    targets = [
        (check_output(path, force), write)
        for path, write in ((csv_path, df.to_csv), (parquet_path, df.to_parquet))
        if path
    ]
    if len(targets) == 2 and targets[0][0].resolve() == targets[1][0].resolve():
        raise QBenchError("--csv and --parquet name the same file: give each its own")
    for path, write in targets:
        try:
            write_atomic(path, partial(write, index=False))
        except OSError as exc:
            raise QBenchError(f"cannot write {path}: {exc.strerror or exc}") from None
        console.print(escape(f"wrote {path} ({len(df)} rows)"))


SUITE_COLUMNS = ("suite", "hash", "perplexity", "tasks (items)", "generation", "latency", "calibration", "about")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def suites(ctx, as_json) -> None:
    """List the shipped suites with their contents and hashes."""
    if ctx.invoked_subcommand:
        return
    from qbench.data.suites import load_suite, shipped_suites, suites_dir

    rows = [_suite_row(load_suite(str(path))) for path in shipped_suites()]
    if as_json:
        click.echo(json.dumps([dict(zip(SUITE_COLUMNS, row)) for row in rows], indent=1))
        return
    table = Table(title=escape(f"suites in {suites_dir()}"))
    for h in SUITE_COLUMNS:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*map(escape, row))
    out.print(table)


@suites.command("validate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--model",
    "-m",
    default="smollm2-135m",
    show_default=True,
    help="The model whose tokenizer and positions the suite is checked against, as `qbench run` does.",
)
@click.option("--allow-outside-data", is_flag=True, help="Let the suite read data files outside its own folder.")
@click.option("--trust-task-code", is_flag=True, help="Let the suite's lm-eval task files run Python.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's tokenizer code from the hub.")
def suites_validate(file, model, allow_outside_data, trust_task_code, trust_remote_code) -> None:
    """Check a suite file as `qbench run` checks it before any cell: schema,
    data files, corpora, task items and templates, lm-eval tasks, and the
    tokens against the model (scored tokens exist, sequences fit its
    positions). Exits 2 if invalid."""
    from qbench.data.suites import load_suite
    from qbench.execute.runs import check_suite
    from qbench.sdk.models import locate_model

    suite = load_suite(file, allow_outside_data=allow_outside_data)
    check_suite(suite, str(locate_model(model).path), trust_remote_code, trust_task_code)
    row = _suite_row(suite)
    out.print(
        escape(
            f"valid: {file}: suite '{suite.name}' (hash {row[1]}); perplexity {row[2]}; tasks {row[3]}; "
            f"generation {row[4]}; latency {row[5]}; calibration {row[6]}; checked against {model}"
        ),
        highlight=False,
    )


def _suite_row(suite) -> list[str]:
    from qbench.data.tasks import load_items

    ppl = suite.perplexity
    tasks = ", ".join(
        [f"{t.name} ({len(load_items(suite.resolve(t.path), t.limit))})" for t in suite.tasks]
        + [f"{t} (lm-eval)" for t in (suite.lm_eval.tasks if suite.lm_eval else [])]
    )
    gen = suite.generation
    lat = suite.latency
    cal = suite.calibration
    return [
        suite.name,
        suite.content_hash(),
        f"{ppl.max_tokens} tokens of {ppl.corpus.source}, windows of {'/'.join(map(str, ppl.lengths))}, "
        f"protocol {ppl.protocol}"
        if ppl
        else "-",
        tasks or "-",
        f"{len(gen.prompts)} prompts x {gen.max_new_tokens} tokens" if gen else "-",
        (
            f"{'/'.join(map(str, lat.prompt_lengths))}+{lat.new_tokens} tokens, "
            f"batch {', '.join(map(str, lat.batch_sizes))}"
        )
        if lat
        else "-",
        "; ".join(
            f"{name}: {spec.samples} x {spec.seq_len} tokens of {spec.corpus.source}"
            for name, spec in ([("default", cal)] if cal else []) + list(suite.calibration_sets.items())
        )
        or "-",
        (suite.description or "").strip(),
    ]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


def main(argv: Optional[list[str]] = None) -> None:
    import warnings

    warnings.showwarning = _show_warning  # one line per warning, without the source line
    quiet_library_logs()
    try:
        cli.main(args=argv, prog_name="qbench", standalone_mode=False)
    except QBenchError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        console.print("aborted")
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other error; the usage is one --help away
        where = exc.ctx.command_path if exc.ctx else "qbench"
        console.print(
            f"[red]error:[/] {escape(exc.format_message())} (see `{escape(where)} --help`)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        console.print(f"[red]error:[/] {escape(exc.format_message())}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            _unexpected(exc)
        # the machine's problem, not qbench's: every record already appended is on disk
        what = f"cannot write {exc.filename}" if exc.filename else "a write failed"
        console.print(
            f"[red]error:[/] {escape(what)} ({escape(exc.strerror or str(exc))}): free space or fix the "
            "folder's permissions, then run the command again (finished records are kept)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] in ("qbench", "qbench_plugins"):
            _unexpected(exc)
        # a dependency qbench declares, missing from this environment: the install's fault, not qbench's
        console.print(
            f"[red]error:[/] this command needs the Python module '{escape(exc.name)}', which is not installed: "
            "reinstall qbench with its dependencies (`pip install qbench`, or `make run` in a checkout); "
            "records already measured are kept",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except Exception as exc:  # a bug, not bad input: still one line, the traceback on request
        _unexpected(exc)


#: errno values that mean the disk or the folder, not qbench, stopped a write
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _unexpected(exc: Exception) -> None:
    """A bug, not bad input: one line, the traceback with QBENCH_DEBUG=1.
    Called inside the ``except`` that caught ``exc``."""
    import os

    if os.environ.get("QBENCH_DEBUG"):
        raise  # noqa: PLE0704 - re-raises the exception being handled
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    console.print(
        f"[red]error:[/] unexpected {type(exc).__name__}: {escape(first)} (a qbench bug: rerun with "
        "QBENCH_DEBUG=1 for the traceback and report it)",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(3)


if __name__ == "__main__":
    main()
