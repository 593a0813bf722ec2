"""What runs inside one cell's fresh worker process.

One process per cell keeps memory figures clean and confines a crash, an
out-of-memory kill or a hang to that cell. The worker reports phases and its
record through a pipe; the parent alone writes results.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from qbench.errors import QBenchError
from qbench.models import ModelSpec
from qbench.plugins import PluginSettings


@dataclass(frozen=True)
class CellTask:
    run_id: str
    run_dir: str
    cell: str
    backend: str
    variant: str
    is_baseline: bool
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


def reference_paths(run_dir: str) -> dict[str, Path]:
    folder = Path(run_dir) / "reference"
    return {"dir": folder, "logprobs": folder / "logprobs.safetensors", "meta": folder / "meta.json",
            "generation": folder / "generation.json"}


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def worker_main(task: CellTask, conn, log_path: str) -> None:
    """Entry point of the worker process."""
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

    try:
        record = measure_cell(task, enter)
        conn.send(("result", record))
    except BaseException as exc:  # everything becomes a failed record, never a lost cell
        traceback.print_exc()
        conn.send(("error", {"phase": phase, "error": describe_error(exc, phase)}))
        conn.close()
        sys.exit(1)
    conn.close()


def describe_error(exc: BaseException, phase: str) -> str:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return (f"out of memory during {phase} ({type(exc).__name__}): try a smaller batch_size or "
                f"max_length in the suite, or another device")
    if isinstance(exc, QBenchError):
        return str(exc)
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


def gated_latency(session, prompt, spec, run_dir: Path, cell: str,
                  start_canary: Optional[float] = None) -> dict[str, Any]:
    """The latency workload, timed while a machine canary says the machine
    runs at its usual speed for this run: a measurement taken while it ran
    slower is paused and retried, and labelled if it never recovers. The
    run's first cell compares with its own canary from the cell's start.
    Returns one trial's figures (see qbench.metrics.trials)."""
    from qbench.metrics import metric
    from qbench.metrics.canary import MAX_ATTEMPTS, PAUSE_SECONDS, SLOW_FACTOR, MachineCanary, append_history, \
        typical_ms
    from qbench.metrics.cost import latency_metrics

    gate_started = time.perf_counter()
    canary = MachineCanary()
    history = run_dir / "machine_canary.json"
    measuring = 0.0  # seconds inside latency_metrics
    typical = typical_ms(history) or start_canary
    for attempt in range(1, MAX_ATTEMPTS + 1):
        before = canary.measure()
        started = time.perf_counter()
        result = latency_metrics(session, prompt, spec.new_tokens, spec.warmup, spec.min_reps, spec.min_seconds,
                                 spec.max_reps)
        measuring += time.perf_counter() - started
        after = canary.measure()
        during = max(before, after)
        reference = typical if typical is not None else min(before, after)
        if during <= SLOW_FACTOR * reference or attempt == MAX_ATTEMPTS:
            break
        print(f"[qbench] machine canary {during:.1f} ms vs typical {reference:.1f} ms: latency measured again "
              f"in {PAUSE_SECONDS:g}s", flush=True)
        time.sleep(PAUSE_SECONDS)
    busy = during > SLOW_FACTOR * reference
    append_history(history, cell, min(before, after))
    result["machine_canary_ms"] = metric(
        during, "ms", None, None, typical=reference, attempts=attempt, busy=busy, before=round(before, 3),
        after=round(after, 3), gate_seconds=round(time.perf_counter() - gate_started - measuring, 3),
        label="a fixed decode-like workload (40 MB of float32 matrix-vector products) timed around the latency "
              "phase; typical: the median over the run's earlier cells")
    return result


def measure_cell(task: CellTask, enter) -> dict[str, Any]:
    import torch

    from qbench import progress
    from qbench.artifacts import artifact_weight_bytes, obtain_artifact
    from qbench.environment import collect_environment
    from qbench.metrics import metric, proportion_stderr
    from qbench.metrics.choice import accuracy_metrics
    from qbench.metrics.cost import BackendClock, memory_metrics
    from qbench.metrics.generation import generation_metrics
    from qbench.metrics.quality import fidelity_metrics, perplexity_metrics
    from qbench.metrics.trials import busy_notes, combine_trials
    from qbench.metrics.scoring import Reference, reference_from, score_windows
    from qbench.plugins import get_backend, load_plugins
    from qbench.suites import load_suite
    from qbench.workload import Workload, load_tokenizer

    started = time.time()
    if task.threads:
        torch.set_num_threads(task.threads)
    phase_seconds: dict[str, float] = {}
    clock = {"name": None, "t": time.perf_counter()}

    def phase(name: str) -> None:
        now = time.perf_counter()
        if clock["name"]:
            phase_seconds[clock["name"]] = round(now - clock["t"], 3)
        clock.update(name=name, t=now)
        if name != "done":
            enter(name)

    phase("prepare")
    # The machine's speed at the cell's start, before anything heavy: the
    # reference of the run's first latency measurement (see gated_latency).
    start_canary = None
    if task.is_baseline and not task.latency_trial:
        from qbench.metrics.canary import MachineCanary

        start_canary = MachineCanary().measure()
    model = ModelSpec(**task.model)
    backend = get_backend(load_plugins(task.plugins), task.backend)
    variant, config = backend.parse_variant(task.variant)
    availability = backend.variant_available(config, task.device)
    if not availability.ok:
        raise QBenchError(f"{task.cell} cannot run on {task.device}: {availability.reason}")
    suite = load_suite(task.suite_path)
    work = Workload(suite, load_tokenizer(model.path, model.trust_remote_code))
    calibration, calibration_hash = work.calibration() if backend.needs_calibration(config) else (None, None)
    notes: list[str] = []
    if not task.latency_trial:
        work.prepare()
    if calibration and not task.latency_trial:
        overlap = work.calibration_overlap(calibration)
        if overlap > 0:
            notes.append(f"{overlap:.1%} of the calibration's 13-grams also occur in the evaluation data: "
                         "calibrated quality may be flattered; keep calibration documents apart in the suite")

    phase("quantize")
    progress.set_sink(lambda text: enter(f"quantize (building artifact: {text})"))
    try:
        artifact, cache_hit, key = obtain_artifact(
            backend, variant, config, model.path, model.fingerprint, calibration, calibration_hash,
            on_build=lambda: enter("quantize (building artifact)"))
    finally:
        progress.set_sink(None)

    artifact = artifact.model_copy(update={"trust_remote_code": model.trust_remote_code})

    phase("load")
    load_started = time.perf_counter()
    session = BackendClock(backend.load(artifact, task.device))
    load_seconds = time.perf_counter() - load_started
    weight_bytes = session.weight_bytes()
    verify_quantized(weight_bytes, count_parameters(model.path), config.nominal_bits(), task.cell)

    if task.latency_trial:
        phase("latency")
        trial = gated_latency(session, work.latency_prompt(), suite.latency, Path(task.run_dir), task.cell)
        session.close()
        phase("done")
        return {"status": "ok", "trial": trial, "phase_seconds": phase_seconds}

    metrics: dict[str, Any] = {}
    # Caveats the backend found while quantizing (e.g. a group size that does
    # not divide a layer) belong beside the numbers.
    notes += artifact.meta.get("notes", [])
    refs = reference_paths(task.run_dir)
    fingerprint = work.fingerprint()

    if suite.perplexity:
        phase("perplexity")
        windows = work.perplexity_windows
        reference = None
        if not task.is_baseline:
            meta = json.loads(refs["meta"].read_text()) if refs["meta"].is_file() else None
            if meta is None:
                notes.append("no baseline reference in this run (did the baseline fail?): fidelity not measured")
            elif meta["windows"] != fingerprint["perplexity_windows"]:
                raise QBenchError("the baseline's windows differ from this cell's: the suite or tokenizer changed "
                                  "mid-run; start a new run instead of resuming")
            else:
                reference = Reference.load(refs["logprobs"])
        scores = score_windows(session, windows, suite.perplexity.batch_size, reference=reference,
                               top_k=suite.fidelity.top_k if task.is_baseline else 0)
        token_lp = scores.tensor("token_logprobs")
        n_bytes, n_words = work.scored_text_stats
        metrics.update(perplexity_metrics(token_lp, n_bytes, n_words))
        if task.is_baseline:
            ref = reference_from(scores)
            _write_atomic(refs["logprobs"], ref.save)
            _write_atomic(refs["meta"], lambda p: p.write_text(json.dumps(
                {"windows": fingerprint["perplexity_windows"], "top_k": suite.fidelity.top_k,
                 "cell": task.cell, "tokens": token_lp.numel()})))
        elif reference is not None:
            metrics.update(fidelity_metrics(token_lp, reference.token_logprobs, scores.tensor("kld"),
                                            scores.tensor("same_top"), scores.tensor("tail_mass"),
                                            suite.fidelity.top_k))

    if work.tasks:
        phase("tasks")
        per_task = {}
        for spec, (name, items, windows) in zip(suite.tasks, work.tasks):
            lp = score_windows(session, windows, spec.batch_size).tensor("token_logprobs")
            per_task[name] = accuracy_metrics(items, lp, windows)
        metrics["tasks"] = per_task
        # Pooled over every item of every task: total correct / total items.
        n_total = sum(len(items) for _, items, _ in work.tasks)
        for key in ("acc", "acc_norm"):
            value = sum(per_task[name][key]["value"] * len(items) for name, items, _ in work.tasks) / n_total
            metrics[key] = metric(value, "fraction", n_total, proportion_stderr(value, n_total))

    if suite.generation:
        phase("generation")
        outputs = [session.generate(p, suite.generation.max_new_tokens, lambda: None)[0].tolist()
                   for p in work.generation_prompts]
        if task.is_baseline:
            _write_atomic(refs["generation"], lambda p: p.write_text(json.dumps(outputs)))
        elif refs["generation"].is_file():
            metrics.update(generation_metrics(outputs, json.loads(refs["generation"].read_text())))
        else:
            notes.append("no baseline generations in this run: generation fidelity not measured")

    if suite.latency:
        phase("latency")
        trial = gated_latency(session, work.latency_prompt(), suite.latency, Path(task.run_dir), task.cell,
                              start_canary)
        metrics.update(combine_trials([trial]))
        notes += busy_notes(metrics)

    metrics.update(memory_metrics(session, task.device))
    on_disk = artifact_weight_bytes(artifact)
    if on_disk is not None:
        metrics["artifact_bytes"] = metric(on_disk, "bytes", None, None,
                                           label="size of the artifact's tensor files on disk")
        if abs(weight_bytes - on_disk) > 0.1 * on_disk:
            notes.append(f"the session holds {weight_bytes / 2**20:.1f} MiB of weights but its artifact has "
                         f"{on_disk / 2**20:.1f} MiB on disk: storage differs between file and memory")
    metrics["load_seconds"] = {"value": load_seconds, "unit": "s"}
    metrics["quantize_seconds"] = {"value": artifact.quantize_seconds, "unit": "s",
                                   "cached": cache_hit, "label": "time the artifact took to build, even if cached"}
    describe = session.describe()
    notes += describe.pop("notes", [])  # what the backend found at load (e.g. a kernel's dtype)
    session.close()
    phase("done")
    measured = sum(phase_seconds.get(p, 0.0) for p in ("perplexity", "tasks", "generation", "latency"))
    # The canary's measurements and pauses wait for the machine on purpose:
    # not harness work around backend calls.
    measured -= (metrics.get("machine_canary_ms") or {}).get("gate_seconds", 0.0)
    harness = max(measured - session.seconds, 0.0)
    metrics["harness_share"] = metric(
        harness / measured if measured else 0.0, "fraction", None, None, seconds=round(harness, 3),
        backend_seconds=round(session.seconds, 3),
        label="share of the measurement phases' time spent outside backend calls (tokenizing aside: "
              "log-softmax, metrics, bookkeeping)")
    return {
        "status": "ok",
        "metrics": metrics,
        "notes": notes,
        "config": config.settings(),
        "nominal_bits": config.nominal_bits(),
        "backend_version": backend.version(),
        "artifact": {"key": key, "cache_hit": cache_hit, "path": artifact.path, "meta": artifact.meta},
        "calibration": {"hash": calibration_hash, "samples": len(calibration)} if calibration else None,
        "workload": fingerprint,
        "session": describe,
        "env": collect_environment(task.device),
        "phase_seconds": phase_seconds,
        "started": started,
    }
