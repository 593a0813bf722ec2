"""What runs inside one cell's fresh worker process.

One process per cell keeps memory figures clean and confines a crash, an
out-of-memory kill or a hang to that cell. The worker reports phases and its
record through a pipe; the parent alone writes results.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from qbench.cell.reference import BaselineReference
from qbench.core.cells import CellSpec
from qbench.core.errors import QBenchError
from qbench.core.processes import die_with_parent
from qbench.sdk.backend import ignore_step
from qbench.sdk.models import ModelSpec
from qbench.sdk.registry import PluginSettings


@dataclass(frozen=True)
class CellTask:
    run_id: str
    run_dir: str
    spec: CellSpec
    model: dict
    suite_path: str
    device: str
    threads: Optional[int]
    plugins: PluginSettings
    #: 0: the whole cell. n >= 2: only latency trial n, in a fresh process
    #: after every cell ran (see qbench.metrics.trials).
    latency_trial: int = 0
    #: the parent's environment when the task was made: a fork-server child
    #: would otherwise inherit the server's, from when it started
    env: Optional[dict] = None
    #: the user allowed the suite to read data outside its folder
    allow_outside_data: bool = False
    #: the user let lm-eval task files run code
    trust_task_code: bool = False
    #: GPUs the model is spread over (``--gpus-per-cell``): the worker sees that many
    gpus_per_cell: int = 1

    @property
    def cell(self) -> str:
        return self.spec.cell

    @property
    def is_baseline(self) -> bool:
        return self.spec.baseline


def worker_main(task: CellTask, conn, log_path: str) -> None:
    """Entry point of the worker process."""
    die_with_parent()
    if task.env is not None:
        os.environ.clear()
        os.environ.update(task.env)
    # Backend libraries print progress bars and warnings; keep them in the
    # cell's log instead of on top of the runner's progress display.
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    phase = "start"

    def enter(name: str) -> None:
        nonlocal phase
        phase = name
        print(f"[qbench] phase: {name}", flush=True)
        conn.send(("phase", name))

    pipeline = None
    try:
        pipeline = CellPipeline(task, enter, lambda part: conn.send(("partial", part)))
        record = pipeline.run()
        conn.send(("result", record))
    except BaseException as exc:  # everything becomes a failed record, never a lost cell
        traceback.print_exc()
        outcome: dict[str, Any] = {"phase": phase, "error": describe_error(exc, phase)}
        kept = pipeline.finished_part() if pipeline is not None else None
        if kept:  # the phases that finished before this one keep their figures
            outcome["partial"] = kept
        conn.send(("error", outcome))
        conn.close()
        sys.exit(1)
    conn.close()


def describe_error(exc: BaseException, phase: str) -> str:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return (
            f"out of memory during {phase} ({type(exc).__name__}): try a smaller batch_size or "
            f"max_length in the suite, or another device"
        )
    if isinstance(exc, QBenchError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return (
            f"no space left on the disk during {phase}{where} ({exc.strerror}): free space there (or point "
            f"$QBENCH_CACHE / -o elsewhere), then rerun this cell with --resume --retry-failed"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__} during {phase}: {first}"[:500]


def verify_quantized(weight_bytes: int, n_params: Optional[int], bits: Optional[float], cell: str) -> None:
    """Refuse a row whose weights are secretly full precision.

    Deliberately loose, because embeddings, the output head and norms often
    stay in full precision and dominate small models: a variant that promises
    fewer than 32 bits must hold under 90% of the fp32 bytes. That catches the
    classic silent fallback (a "quantized" model loaded as plain fp32);
    backends check their own module types on top."""
    if bits is None or n_params is None or bits >= 32:
        return
    fp32 = n_params * 4
    if weight_bytes > 0.9 * fp32:
        raise QBenchError(
            f"{cell} promises {bits:g}-bit weights but holds {weight_bytes / 2**20:.1f} MiB, as much as fp32 "
            f"({fp32 / 2**20:.1f} MiB for {n_params / 1e6:.2f}M parameters): quantization did not happen, "
            f"so its numbers are not reported"
        )


def count_parameters(model_path: str) -> Optional[int]:
    """Parameters stored in the model's safetensors files (headers only)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


#: the quality figures a context sweep keeps at each length
CONTEXT_QUALITY = ("perplexity", "nll", "ln_ppl_ratio", "kld", "same_top_p")


def gated_latency(
    session,
    prompt,
    spec,
    run_dir: Path,
    cell: str,
    start_canary: Optional[dict[str, float]] = None,
    device: str = "cpu",
    eager: bool = True,
) -> dict[str, Any]:
    """The latency workload, timed while a canary of the resource the row's
    speed depends on (see qbench.metrics.canary: the CPU; on CUDA the GPU's
    memory bandwidth, and the host's kernel launches for ``eager`` rows)
    says the machine runs at its usual speed for this run: a measurement
    whose canary readings before and after both ran slower is paused and
    retried, and labelled if it never recovers. The canary is judged against
    the run's earlier cells, each summarised by the median of its readings;
    the run's first cell compares with its own reading from the cell's start
    (on the CPU) or, without one, its better reading around the measurement.
    Returns one trial's figures (see qbench.metrics.trials)."""
    from qbench.metrics import metric
    from qbench.metrics.canary import (
        MAX_ATTEMPTS,
        PAUSE_SECONDS,
        SLOW_FACTOR,
        append_history,
        cell_figure,
        make_canary,
        slowdown,
        typical,
    )
    from qbench.metrics.cost import latency_metrics

    gate_started = time.perf_counter()
    canary = make_canary(device)
    history = run_dir / "machine_canary.json"
    measuring = 0.0  # seconds inside latency_metrics

    usual = typical(history) or dict(start_canary or {})
    readings = [dict(start_canary)] if start_canary else []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        before = canary.read(eager)
        started = time.perf_counter()
        result = latency_metrics(
            session, prompt, spec.new_tokens, spec.warmup, spec.min_reps, spec.min_seconds, spec.max_reps
        )
        measuring += time.perf_counter() - started
        after = canary.read(eager)
        readings += [before, after]
        # Slow only when slow on both sides: one reading's jitter is no busy machine.
        during = {key: min(before[key], after[key]) for key in before}
        reference = {key: usual.get(key) or during[key] for key in during}
        ratio, key = slowdown(during, reference)
        if ratio <= SLOW_FACTOR or attempt == MAX_ATTEMPTS:
            break
        print(
            f"[qbench] canary ({canary.resources[key]}) {during[key]:.3f} ms vs typical {reference[key]:.3f} ms: "
            f"latency measured again in {PAUSE_SECONDS:g}s",
            flush=True,
        )
        time.sleep(PAUSE_SECONDS)
    append_history(history, cell, cell_figure(readings))
    result["machine_canary_ms"] = metric(
        during["ms"],
        "ms",
        None,
        None,
        typical=reference["ms"],
        attempts=attempt,
        busy=ratio > SLOW_FACTOR,
        ratio=round(ratio, 4),
        resource=canary.resources[key],
        before=round(before["ms"], 4),
        after=round(after["ms"], 4),
        **(
            {"launch_ms": round(during["launch_ms"], 4), "typical_launch_ms": round(reference["launch_ms"], 4)}
            if "launch_ms" in during
            else {}
        ),
        gate_seconds=round(time.perf_counter() - gate_started - measuring, 3),
        label=f"a fixed workload of {', and '.join(canary.resources[k] for k in during)}, timed around the latency "
        "phase; typical: the median over the run's earlier cells",
    )
    return result


class CellPipeline:
    """One cell's measurement, one method per phase, in the order ``run``
    calls them: prepare, obtain the artifact, load and verify, then
    perplexity with fidelity, tasks, generation and latency, then the
    record. Each phase adds to ``metrics`` and ``notes``; ``phase_seconds``
    says how long each took. A latency trial (``task.latency_trial >= 2``)
    runs only prepare, artifact, load and latency."""

    QUALITY_PHASES = ("perplexity", "tasks", "lm-eval", "generation", "latency")

    def __init__(
        self,
        task: CellTask,
        enter: Callable[[str], None],
        checkpoint: Callable[[dict[str, Any]], None] = lambda part: None,
    ):
        self.task = task
        self.enter = enter
        #: receives ``finished_part()`` after each measurement phase, so the
        #: parent keeps it even if this process is killed in a later one
        self.checkpoint = checkpoint
        self.metrics: dict[str, Any] = {}
        self.tasks: dict[str, Any] = {}
        self.notes: list[str] = []
        self.phase_seconds: dict[str, float] = {}
        self._phase: Optional[str] = None
        self._phase_started = time.perf_counter()
        self.started = time.time()
        self.start_canary: Optional[dict[str, float]] = None
        #: seconds the canary's readings and pauses took, over every latency
        #: measurement of the cell (each batch size of a sweep has its own)
        self.gate_seconds = 0.0
        #: per context length of a long-context suite (qbench.core.records.CellRecord.context_sweep)
        self.contexts: dict[int, dict[str, Any]] = {}
        #: measurement phases finished, with a snapshot of the figures they left
        self.completed: list[str] = []
        self._kept: tuple[dict, dict, list] = ({}, {}, [])
        baseline = task.cell if task.is_baseline else None
        self.reference = BaselineReference(
            Path(task.run_dir),
            {
                "run_id": task.run_id,
                "model": ModelSpec(**task.model).fingerprint,
                **({"cell": baseline} if baseline else {}),
            },
        )

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        if self._phase:
            self.phase_seconds[self._phase] = round(now - self._phase_started, 3)
        self._phase, self._phase_started = name, now
        if name != "done":
            self.enter(name)

    def run(self) -> dict[str, Any]:
        self.prepare()
        self.obtain_artifact()
        self.load()
        if self.task.latency_trial:
            trial = self.measure_latency_trial()
            self.phase("done")
            return {"status": "ok", "trial": trial, "phase_seconds": self.phase_seconds}
        for name, wanted, measure in (
            ("perplexity", self.suite.perplexity, self.measure_perplexity),
            ("tasks", self.work.tasks, self.measure_tasks),
            ("lm-eval", self.suite.lm_eval, self.measure_lm_eval),
            ("generation", self.suite.generation, self.measure_generation),
            ("latency", self.suite.latency, self.measure_latency),
        ):
            if wanted:
                measure()
                self.completed.append(name)
                self._kept = (dict(self.metrics), dict(self.tasks), list(self.notes))
                if name != "latency":  # the record follows at once
                    self.checkpoint(self.finished_part())
        return self.record()

    def finished_part(self) -> Optional[dict[str, Any]]:
        """What the phases that finished measured, for the record of a cell
        that failed in a later phase (None when none finished). Never
        raises: it runs while the cell is already failing."""
        if not self.completed:
            return None
        metrics, tasks, notes = dict(self._kept[0]), dict(self._kept[1]), list(self._kept[2])
        try:
            from qbench.metrics import metric

            metrics["weight_bytes"] = metric(
                self.weight_bytes,
                "bytes",
                None,
                None,
                label="bytes of weights held by the loaded model (packed storage, scales included)",
            )
        except Exception:  # noqa: BLE001 - the partial record is worth more than this figure
            pass
        part: dict[str, Any] = {
            "metrics": metrics,
            "tasks": tasks,
            "notes": notes,
            "completed_phases": list(self.completed),
            "phase_seconds": dict(self.phase_seconds),
            "started": self.started,
            "context_sweep": {length: dict(figures) for length, figures in self.contexts.items()},
        }
        try:
            part.update(
                config=self.config.settings(),
                nominal_bits=self.config.nominal_bits(),
                backend_version=self.backend.version(),
                workload=self.work.fingerprint(),
                artifact={
                    "key": self.artifact_key,
                    "cache_hit": self.cache_hit,
                    "path": self.artifact.path,
                    "meta": self.artifact.meta,
                },
            )
        except Exception:  # noqa: BLE001
            pass
        return part

    def prepare(self) -> None:
        import torch

        from qbench.data.suites import load_suite
        from qbench.data.workload import Workload
        from qbench.sdk.hf import load_tokenizer
        from qbench.sdk.registry import get_backend, load_plugins

        task = self.task
        if task.threads:
            torch.set_num_threads(task.threads)
        self.phase("prepare")
        # The machine's speed at the cell's start, before anything heavy: the
        # reference of the run's first latency measurement (see gated_latency).
        if task.is_baseline and not task.latency_trial and task.device != "cuda":
            from qbench.metrics.canary import MachineCanary

            self.start_canary = MachineCanary().read()
        self.model = ModelSpec(**task.model)
        self.backend = get_backend(load_plugins(task.plugins), task.spec.backend)
        self.variant = task.spec.variant_text
        config = self.backend.config_for(task.spec.variant, task.spec.settings)
        self.config = self.backend.for_device(config, task.device)
        availability = self.backend.cell_available(self.config, task.device)
        if not availability.ok:
            raise QBenchError(f"{task.cell} cannot run on {task.device}: {availability.reason}")
        if task.gpus_per_cell > 1 and torch.cuda.device_count() < task.gpus_per_cell:
            raise QBenchError(
                f"{task.cell} is to be spread over {task.gpus_per_cell} GPUs but its worker sees "
                f"{torch.cuda.device_count()}: check CUDA_VISIBLE_DEVICES and --gpus"
            )
        self.suite = load_suite(task.suite_path, allow_outside_data=task.allow_outside_data)
        self.config = self.backend.with_suite(self.config, self.suite)
        self.work = Workload(self.suite, load_tokenizer(self.model.path, self.model.trust_remote_code))
        self.calibration, self.calibration_hash = (
            self.work.calibration(self.config.calibration)
            if self.backend.needs_calibration(self.config)
            else (None, None)
        )
        if not task.latency_trial:
            self.work.prepare()
            if self.calibration:
                overlap = self.work.calibration_overlap(self.calibration)
                if overlap > 0:
                    self.notes.append(
                        f"{overlap:.1%} of the calibration's 13-grams also occur in the evaluation "
                        "data: calibrated quality may be flattered; keep calibration documents apart "
                        "in the suite"
                    )

    def obtain_artifact(self) -> None:
        from qbench.cell.artifacts import artifact_key, build_apart, is_cached, obtain_artifact
        from qbench.core import progress

        self.phase("quantize")
        built = False
        key = artifact_key(self.model.fingerprint, self.backend, self.config, self.calibration_hash)
        if self.backend.builds_apart and not is_cached(self.backend.name, key):
            self.enter("quantize (building artifact in a process of its own)")
            build_apart(
                self.task.plugins,
                self.backend,
                self.variant,
                self.config,
                self.model.path,
                self.model.fingerprint,
                self.calibration,
                self.calibration_hash,
                self.task.threads,
                on_progress=lambda text: self.enter(f"quantize (building artifact: {text})"),
            )
            built = True
        progress.set_sink(lambda text: self.enter(f"quantize (building artifact: {text})"))
        try:
            artifact, hit, self.artifact_key = obtain_artifact(
                self.backend,
                self.variant,
                self.config,
                self.model.path,
                self.model.fingerprint,
                self.calibration,
                self.calibration_hash,
                on_build=lambda: self.enter("quantize (building artifact)"),
            )
        finally:
            progress.set_sink(None)
        self.cache_hit = hit and not built  # built by this cell, in its child process
        self.artifact = artifact.model_copy(
            update={"trust_remote_code": self.model.trust_remote_code, "gpus": self.task.gpus_per_cell}
        )

    def load(self) -> None:
        from qbench.metrics.cost import BackendClock

        self.phase("load")
        started = time.perf_counter()
        self.session = BackendClock(self.backend.load(self.artifact, self.task.device))
        self.load_seconds = time.perf_counter() - started
        reason = self.session.use_kv_cache(self.config.kv_cache)  # before anything is scored or decoded
        if reason:
            raise QBenchError(f"{self.task.cell}: {reason}")
        self.weight_bytes = self.session.weight_bytes()
        verify_quantized(
            self.weight_bytes, count_parameters(self.model.path), self.config.nominal_bits(), self.task.cell
        )

    def measure_perplexity(self) -> None:
        """The row's perplexity and fidelity on the first window length; with
        more lengths (long context), the same figures at each, kept in the
        context sweep."""
        from qbench.data.windows import windows_hash
        from qbench.metrics import metric

        self.phase("perplexity")
        spec = self.suite.perplexity
        for index, (length, windows) in enumerate(self.work.context_windows.items()):
            headline = index == 0
            figures = self.score_at(windows, windows_hash(windows), None if headline else length, spec.batch_at(length))
            if headline:
                self.metrics.update(figures)
            if len(spec.lengths) > 1:
                kept = {k: v for k, v in figures.items() if k in CONTEXT_QUALITY}
                measured = self.session.kv_measured_bytes_per_position()
                if measured is not None:
                    kept["kv_bytes_per_token_measured"] = metric(measured, "bytes")
                self.contexts.setdefault(length, {}).update(kept)

    def score_at(self, windows, windows_hash: str, length: Optional[int], batch_size: int) -> dict[str, Any]:
        """Perplexity (and, against the baseline's reference, fidelity) on
        ``windows``; the baseline stores its reference of them instead.
        ``length`` names a context sweep's further length (None: the row's own)."""
        from qbench.metrics.quality import fidelity_metrics, perplexity_metrics
        from qbench.metrics.scoring import reference_from, score_windows

        reference = None
        if not self.task.is_baseline:
            reference = self.reference.load_scores(windows_hash, length)
            if reference is None:
                self.notes.append(
                    "no baseline reference in this run (did the baseline fail?): fidelity not measured"
                    + (f" at max_length {length}" if length else "")
                )
        scores = score_windows(
            self.session,
            windows,
            batch_size,
            reference=reference,
            top_k=self.suite.fidelity.top_k if self.task.is_baseline else 0,
        )
        token_lp = scores.tensor("token_logprobs")
        n_bytes, n_words = self.work.scored_text_stats if length is None else (0, 0)
        figures = perplexity_metrics(token_lp, n_bytes, n_words)
        if self.task.is_baseline:
            self.reference.save_scores(
                reference_from(scores), windows_hash, self.suite.fidelity.top_k, self.task.cell, length
            )
        elif reference is not None:
            figures.update(
                fidelity_metrics(
                    token_lp,
                    reference.token_logprobs,
                    scores.tensor("kld"),
                    scores.tensor("same_top"),
                    scores.tensor("tail_mass"),
                    self.suite.fidelity.top_k,
                )
            )
        return figures

    def measure_tasks(self) -> None:
        from qbench.metrics import metric, proportion_stderr
        from qbench.metrics.choice import accuracy_metrics
        from qbench.metrics.scoring import score_windows

        self.phase("tasks")
        for spec, (name, items, windows) in zip(self.suite.tasks, self.work.tasks):
            lp = score_windows(self.session, windows, spec.batch_size).tensor("token_logprobs")
            self.tasks[name] = accuracy_metrics(items, lp, windows)
        # Pooled over every item of every task: total correct / total items.
        n_total = sum(len(items) for _, items, _ in self.work.tasks)
        for name in ("acc", "acc_norm"):
            value = sum(self.tasks[task][name]["value"] * len(items) for task, items, _ in self.work.tasks) / n_total
            self.metrics[name] = metric(value, "fraction", n_total, proportion_stderr(value, n_total))

    def measure_lm_eval(self) -> None:
        """The suite's lm-eval tasks, each task's figures as lm-eval reports
        them, under ``lm_eval:TASK`` in the record's tasks."""
        from qbench.cell.lm_eval_engine import evaluate
        from qbench.data.workload import max_positions
        from qbench.metrics import metric

        self.phase("lm-eval")
        spec = self.suite.lm_eval
        max_length = spec.max_length or max_positions(self.model.path) or 2048
        results = evaluate(self.session, self.work.tokenizer, spec, self.suite, self.task.trust_task_code, max_length)
        for task, found in results.items():
            self.tasks[f"lm_eval:{task}"] = {
                name: metric(
                    value,
                    "lm-eval",
                    found["samples"],
                    stderr,
                    engine="lm-eval",
                    task_version=found["version"],
                    max_length=max_length,
                )
                for name, (value, stderr) in found["metrics"].items()
            }

    def measure_generation(self) -> None:
        from qbench.metrics.generation import generation_metrics

        self.phase("generation")
        outputs = [
            self.session.generate(p, self.suite.generation.max_new_tokens, ignore_step)[0].tolist()
            for p in self.work.generation_prompts
        ]
        if self.task.is_baseline:
            self.reference.save_generation(outputs)
            return
        baseline = self.reference.load_generation()
        if baseline is None:
            self.notes.append("no baseline generations in this run: generation fidelity not measured")
        else:
            self.metrics.update(generation_metrics(outputs, baseline))

    def switch_runtime(self) -> None:
        """Decode the latency workload through the cell's runtime. A compiled
        runtime compiles (and captures its CUDA graph) on a first, untimed
        pass of the workload, reported as ``compile_seconds``."""
        from qbench.metrics import metric

        runtime = self.config.runtime
        reason = self.session.use_runtime(runtime, self.config.compile_mode)
        if reason:
            raise QBenchError(f"{self.task.cell}: runtime={runtime} is not available: {reason}")
        if runtime == "eager":
            return
        started = time.perf_counter()
        self.session.generate(self.work.latency_prompt(), self.suite.latency.new_tokens, ignore_step)
        self.metrics["compile_seconds"] = metric(
            time.perf_counter() - started,
            "s",
            None,
            None,
            runtime=runtime,
            compile_mode=self.config.compile_mode,
            label="first pass of the latency workload through the compiled runtime (compilation and CUDA-graph "
            "capture); not part of the latency figures",
        )

    def measure_latency(self) -> None:
        from qbench.metrics.trials import busy_notes, combine_trials

        self.phase("latency")
        self.switch_runtime()
        self.trial = self.gated(self.work.latency_prompt(), self.start_canary)
        self.trial["latency_workload"]["runtime"] = self.config.runtime
        self.metrics.update(combine_trials([self.trial]))
        self.notes += busy_notes(self.metrics)
        self.metrics.update(self.roofline(self.trial))
        if len(self.suite.latency.batch_sizes) > 1:
            self.measure_batch_sweep()
        if len(self.suite.latency.prompt_lengths) > 1:
            self.measure_prompt_sweep()

    def measure_prompt_sweep(self) -> None:
        """The latency workload at every prompt length of the suite, at its
        first batch size, in this process (the first length's figures are the
        row's own). Running out of memory at a length is a note and ends the
        sweep; longer prompts would too."""
        import torch

        for tokens in self.suite.latency.prompt_lengths:
            if tokens == self.suite.latency.prompt_lengths[0]:
                trial = self.trial
            else:
                try:
                    trial = self.gated(self.work.latency_prompt(tokens=tokens))
                except (torch.OutOfMemoryError, MemoryError):
                    self.notes.append(f"prompt sweep stopped at {tokens} tokens: out of memory")
                    break
            self.contexts.setdefault(tokens, {}).update(
                prefill_ms=trial["prefill_ms"],
                decode_ms_per_token=trial["decode_ms_per_token"],
                decode_tokens_per_s=trial["decode_tokens_per_s"],
                roofline_fraction=self.roofline(trial)["roofline_fraction"],
            )

    def measure_batch_sweep(self) -> None:
        """The latency workload at every batch size of the suite's sweep, in
        this process (the first batch size's figures are the row's own, from
        its trials). A batch size that runs out of memory is a note and ends
        the sweep; the larger ones would too."""
        import torch

        spec = self.suite.latency
        self.sweep: dict[int, dict[str, Any]] = {}
        for batch in spec.batch_sizes:
            if batch == spec.batch_sizes[0]:
                trial = self.trial
            else:
                try:
                    trial = self.gated(self.work.latency_prompt(batch))
                except (torch.OutOfMemoryError, MemoryError):
                    self.notes.append(f"batch sweep stopped at batch {batch}: out of memory")
                    break
            self.sweep[batch] = {
                "prefill_ms": trial["prefill_ms"],
                "decode_ms_per_token": trial["decode_ms_per_token"],
                "decode_tokens_per_s": trial["decode_tokens_per_s"],
                "roofline_fraction": self.roofline(trial)["roofline_fraction"],
            }

    def roofline(self, trial: dict[str, Any]) -> dict[str, Any]:
        """One latency measurement's decode bandwidth against the run's
        measured peak (add_trial recomputes the row's when trials change its
        decode time)."""
        from qbench.metrics.roofline import roofline_metrics, run_bandwidth
        from qbench.metrics.trials import trial_workload

        bandwidth = run_bandwidth(Path(self.task.run_dir), self.task.device)
        return roofline_metrics(
            self.weight_bytes - self.session.unread_weight_bytes(),
            self.session.kv_bytes_per_position(),
            trial_workload([trial]),
            trial["decode_ms_per_token"]["value"],
            bandwidth,
        )

    def measure_latency_trial(self) -> dict[str, Any]:
        self.phase("latency")
        self.switch_runtime()
        trial = self.gated(self.work.latency_prompt())
        trial["latency_workload"]["runtime"] = self.config.runtime
        self.session.close()
        return trial

    def gated(self, prompt, start_canary: Optional[dict[str, float]] = None) -> dict[str, Any]:
        """The latency workload on ``prompt`` behind the canary of this cell's device and runtime."""
        result = gated_latency(
            self.session,
            prompt,
            self.suite.latency,
            Path(self.task.run_dir),
            self.task.cell,
            start_canary,
            self.task.device,
            eager=self.config.runtime == "eager",
        )
        self.gate_seconds += result["machine_canary_ms"]["gate_seconds"]
        return result

    def cost_metrics(self, storage: Optional[str] = None) -> None:
        """Memory and load figures. ``storage``: the backend's reason why the
        weights it holds differ from its artifact's files, if it knows one."""
        from qbench.cell.artifacts import artifact_weight_bytes
        from qbench.metrics import metric
        from qbench.metrics.cost import memory_metrics

        self.metrics.update(memory_metrics(self.session, self.task.device))
        on_disk = artifact_weight_bytes(self.artifact)
        if on_disk is not None:
            self.metrics["artifact_bytes"] = metric(
                on_disk, "bytes", None, None, label="size of the artifact's tensor files on disk"
            )
            if abs(self.weight_bytes - on_disk) > 0.1 * on_disk:
                self.notes.append(
                    f"the session holds {self.weight_bytes / 2**20:.1f} MiB of weights but its "
                    f"artifact has {on_disk / 2**20:.1f} MiB on disk: "
                    + (storage or "storage differs between file and memory")
                )
        self.metrics["load_seconds"] = metric(self.load_seconds, "s")
        per_position = self.session.kv_bytes_per_position()
        if per_position is not None:
            self.metrics["kv_bytes_per_token"] = metric(
                per_position,
                "bytes",
                kv_cache=self.config.kv_cache,
                label="KV cache bytes per position of one sequence, computed from the cache's storage type",
            )
        for length, figures in self.contexts.items():
            if per_position is not None:
                figures["kv_bytes"] = metric(
                    per_position * length, "bytes", label=f"KV cache of one sequence of {length} tokens, computed"
                )
            figures["total_bytes"] = metric(
                self.weight_bytes + (per_position or 0) * length,
                "bytes",
                label=f"weights plus the KV cache of one sequence of {length} tokens",
            )
        measured = self.session.kv_measured_bytes_per_position()
        if measured is not None:
            self.metrics["kv_bytes_per_token_measured"] = metric(
                measured,
                "bytes",
                label="KV cache bytes per position that the last scoring pass's cache held (scales and the "
                "full-precision residual included)",
            )
        self.metrics["quantize_seconds"] = metric(
            self.artifact.quantize_seconds,
            "s",
            cached=self.cache_hit,
            label="time the artifact took to build, even if cached",
        )

    def harness_share(self) -> None:
        from qbench.metrics import metric

        # The canary's measurements and pauses wait for the machine on purpose:
        # not harness work around backend calls.
        measured = sum(self.phase_seconds.get(p, 0.0) for p in self.QUALITY_PHASES) - self.gate_seconds
        harness = max(measured - self.session.seconds, 0.0)
        self.metrics["harness_share"] = metric(
            harness / measured if measured else 0.0,
            "fraction",
            None,
            None,
            seconds=round(harness, 3),
            backend_seconds=round(self.session.seconds, 3),
            label="share of the measurement phases' time spent outside backend calls (tokenizing aside: "
            "log-softmax, metrics, bookkeeping)",
        )

    def record(self) -> dict[str, Any]:
        """The record's measured part; the parent adds identity and timing."""
        from qbench.core.environment import collect_environment
        from qbench.metrics.trials import trial_workload

        # Caveats the backend found while quantizing (e.g. a group size that
        # does not divide a layer) belong beside the numbers.
        self.notes += self.artifact.meta.get("notes", [])
        describe = self.session.describe()
        self.cost_metrics(describe.get("storage"))
        self.notes += describe.pop("notes", [])  # what the backend found at load (e.g. a kernel's dtype)
        self.session.close()
        self.phase("done")
        self.harness_share()
        trials = [self.trial] if self.suite.latency else []
        return {
            "status": "ok",
            "metrics": self.metrics,
            "tasks": self.tasks,
            "latency_trials": trials,
            "latency_workload": trial_workload(trials) if trials else None,
            "latency_sweep": getattr(self, "sweep", {}),
            "context_sweep": self.contexts,
            "notes": self.notes,
            "config": self.config.settings(),
            "nominal_bits": self.config.nominal_bits(),
            "backend_version": self.backend.version(),
            "artifact": {
                "key": self.artifact_key,
                "cache_hit": self.cache_hit,
                "path": self.artifact.path,
                "meta": self.artifact.meta,
                "verify_seconds": self.artifact.verify_seconds,
            },
            "calibration": (
                {"hash": self.calibration_hash, "samples": len(self.calibration), "name": self.config.calibration}
                if self.calibration
                else None
            ),
            "workload": self.work.fingerprint(),
            "session": describe,
            "env": collect_environment(self.task.device),
            "phase_seconds": self.phase_seconds,
            "completed_phases": self.completed,
            "started": self.started,
        }
