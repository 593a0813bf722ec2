"""``qbench search``: the smallest configuration that meets a quality budget.

A search folder holds everything: ``search.json`` (its settings),
``suite.yaml`` (the sections of the user's suite that the budget needs),
``cells/`` (a normal run folder: every configuration tried is one of its
cells, so ``show``, ``report`` and ``compare`` work on it),
``sensitivity/`` (the ranking the mixed recipes are built from),
``recipes/`` and ``search_result.json``. Every step is decided from records
already on disk, so running the same search again skips what was measured
and finishes what was not.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel

from qbench.analyze import sensitivity as sens
from qbench.analyze.sensitivity_run import run_sensitivity
from qbench.core.cells import CellSpec
from qbench.core.environment import resolve_device
from qbench.core.errors import QBenchError
from qbench.core.io import write_atomic
from qbench.core.paths import results_dir
from qbench.core.records import CellRecord
from qbench.data.suites import load_suite, suite_path
from qbench.execute.results import ResultStore, run_lock
from qbench.execute.runner import PLAN_FILE, check_run_id, execute, new_run_id, save_plan
from qbench.execute.runs import create_run, resume_run
from qbench.metrics.registry import Z, at_error_bar, info, judge
from qbench.sdk.recipes import keep_most_sensitive, write_recipe
from qbench.sdk.registry import PluginSettings, get_backend, load_plugins

SETTINGS_FILE, SUITE_FILE, RESULT_FILE, PLOT_FILE = "search.json", "suite.yaml", "search_result.json", "search.png"
CELLS, SENSITIVITY, RECIPES = "cells", "sensitivity", "recipes"
_BUDGET = re.compile(r"^\s*(kld|acc|weights|memory@([0-9]+))\s*(<=|>=)\s*(.+?)\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^([0-9.]+)\s*(MiB|GiB|MB|GB)?$", re.IGNORECASE)
_UNITS = {"mib": 2**20, "gib": 2**30, "mb": 1e6, "gb": 1e9}


class Budget(BaseModel):
    """``kld<=X``, ``acc>=X`` or ``acc>=F*base``; ``weights<=X MiB``, or
    ``memory@N<=X MiB``: weights plus the KV cache of one sequence of N
    tokens (each row's KV bytes per token, so rows that differ in their
    ``kv_cache`` compete too)."""

    metric: Literal["kld", "acc", "weights", "memory"]
    bound: float
    relative: bool = False  # acc>=F*base: F times the baseline's accuracy
    #: memory@N: the context length N
    context: Optional[int] = None
    text: str

    @property
    def is_size(self) -> bool:
        """A size budget (weights, memory@N): the best quality that fits."""
        return self.metric in ("weights", "memory")

    @classmethod
    def parse(cls, text: str) -> Budget:
        hint = "write kld<=0.05, acc>=0.99*base, acc>=0.7, weights<=150MiB or memory@8192<=600MiB"
        found = _BUDGET.match(text)
        if not found:
            raise QBenchError(f"budget '{text}' is not understood: {hint}")
        metric, op, value = found.group(1).lower(), found.group(3), found.group(4).replace(" ", "")
        context = int(found.group(2)) if found.group(2) else None
        if context is not None:
            metric = "memory"
            if context < 1:
                raise QBenchError(f"budget '{text}': the context length must be at least 1 token: {hint}")
        if op != (">=" if metric == "acc" else "<="):
            raise QBenchError(f"budget '{text}': {metric} takes '{'>=' if metric == 'acc' else '<='}': {hint}")
        relative = metric == "acc" and value.lower().endswith("*base")
        if relative:
            value = value[: -len("*base")]
        unit = 1.0
        if metric in ("weights", "memory"):
            size = _SIZE.match(value)
            if not size:
                raise QBenchError(f"budget '{text}': the size needs a number and MiB, GiB, MB or GB: {hint}")
            value, unit = size.group(1), _UNITS[(size.group(2) or "MiB").lower()]
        try:
            bound = float(value) * unit
        except ValueError:
            raise QBenchError(f"budget '{text}': '{value}' is not a number: {hint}") from None
        if not math.isfinite(bound):
            raise QBenchError(f"budget '{text}': the bound must be a finite number: {hint}")
        if bound <= 0 or (metric == "acc" and not relative and bound > 1):
            raise QBenchError(f"budget '{text}': the bound must be positive{' and at most 1' * (metric == 'acc')}")
        return cls.model_validate(
            {"metric": metric, "bound": bound, "relative": relative, "context": context, "text": text.strip()}
        )


class Verdict(BaseModel):
    """One configuration against the budget."""

    cell: str
    kind: Literal["uniform", "recipe"]
    k: Optional[int] = None  # units upgraded, for recipes
    weight_bytes: Optional[float] = None
    #: memory@N budgets: weights plus one sequence's KV cache of N tokens
    memory_bytes: Optional[float] = None
    kld: Optional[float] = None
    kld_stderr: Optional[float] = None
    acc: Optional[float] = None
    acc_stderr: Optional[float] = None
    #: the budget's figure at the error bar (kld + Z*se, acc - Z*se), or the weights
    at_error_bar: Optional[float] = None
    target: float
    meets: bool
    error: Optional[str] = None


class SearchResult(BaseModel):
    budget: Budget
    path: list[Verdict]
    chosen: Optional[Verdict] = None
    best_uniform: Optional[Verdict] = None
    why: str
    seconds: dict[str, float]
    folder: str


def verdict_of(
    budget: Budget, record: CellRecord, baseline: Optional[CellRecord], kind: str, k: Optional[int] = None
) -> Verdict:
    """Whether one measured configuration meets the budget at its error bar:
    KLD's upper end (value + 1.96 stderr) under the bound, accuracy's lower
    end above it, weights as measured. A failed cell never meets it."""
    figures = {name: record.value(name) for name in ("weight_bytes", "kld", "acc")}
    errors = {name: record.stderr(name) or 0.0 for name in ("kld", "acc")}
    target = budget.bound
    if budget.metric == "acc" and budget.relative:
        base_acc = baseline.value("acc") if baseline is not None else None
        if base_acc is None:
            raise QBenchError("budget acc>=F*base needs the baseline's accuracy: the suite needs tasks")
        target = budget.bound * base_acc
    verdict: dict[str, Any] = dict(
        cell=record.cell,
        kind=kind,
        k=k,
        weight_bytes=figures["weight_bytes"],
        kld=figures["kld"],
        kld_stderr=record.stderr("kld"),
        acc=figures["acc"],
        acc_stderr=record.stderr("acc"),
        target=target,
    )
    if not record.ok:
        return Verdict(**verdict, meets=False, error=record.error)
    if budget.metric == "memory":
        per_token = record.value("kv_bytes_per_token")
        if per_token is None or figures["weight_bytes"] is None:
            return Verdict(**verdict, meets=False, error="the record has no KV cache bytes per token")
        at = figures["weight_bytes"] + per_token * budget.context
        return Verdict(**verdict, memory_bytes=at, at_error_bar=at, meets=judge("weight_bytes", at, None, target))
    if budget.metric == "weights":
        at = figures["weight_bytes"]
        return Verdict(**verdict, at_error_bar=at, meets=at is not None and judge("weight_bytes", at, None, target))
    if figures[budget.metric] is None:
        return Verdict(**verdict, meets=False, error=f"the record has no {budget.metric}")
    value, stderr = figures[budget.metric], errors[budget.metric]
    return Verdict(
        **verdict,
        at_error_bar=at_error_bar(value, stderr, info(budget.metric).higher_is_better),
        meets=judge(budget.metric, value, stderr, target),
    )


#: Fewest task items a relative accuracy budget is judged on.
MIN_RELATIVE_ITEMS = 20


def check_relative_items(suite, budget: Budget) -> None:
    """Before any cell: ``acc>=F*base`` needs tasks with enough items for
    the baseline's accuracy to be an estimate at all."""
    from qbench.data.tasks import load_items

    items = sum(len(load_items(suite.resolve(t.path), t.limit)) for t in suite.tasks)
    if items < MIN_RELATIVE_ITEMS:
        raise QBenchError(
            f"budget '{budget.text}' is relative to the baseline's accuracy, but suite '{suite.name}' "
            f"has {items} task item(s) (at least {MIN_RELATIVE_ITEMS} needed): add items, or use an "
            "absolute budget (acc>=0.7) or kld<=X"
        )


def check_relative_baseline(budget: Budget, baseline: Optional[CellRecord]) -> None:
    """After the baseline, before any other cell: a relative budget against
    an accuracy whose 95% interval reaches 0 would call anything a pass
    (0.99 times nothing is nothing)."""
    if baseline is None or not baseline.ok:
        why = baseline.error if baseline is not None else "it did not run"
        raise QBenchError(f"budget '{budget.text}' needs the baseline's accuracy, and the baseline failed: {why}")
    acc, stderr, n = (
        baseline.value("acc"),
        baseline.stderr("acc") or 0.0,
        baseline.metrics["acc"].n if "acc" in baseline.metrics else None,
    )
    if acc is None:
        raise QBenchError(f"budget '{budget.text}' needs the baseline's accuracy: the suite needs tasks")
    if acc - Z * stderr <= 0:
        raise QBenchError(
            f"budget '{budget.text}': the baseline's accuracy is {acc:.4f} ± {Z * stderr:.4f} (95%, "
            f"{n} items), an interval that reaches 0, so any fraction of it is met by chance: use an "
            "absolute budget (acc>=0.7), kld<=X, or tasks the baseline can do"
        )


def quality_rank(verdict: Verdict, budget: Budget) -> float:
    """The verdict's quality as a sort key, lower ranking better: KLD, or
    minus accuracy for an accuracy budget (a search ranks on one of them;
    the report's recommendation ranks on KLD alone)."""
    if budget.metric == "acc":
        return -(verdict.acc if verdict.acc is not None else -1.0)
    return verdict.kld if verdict.kld is not None else float("inf")


def derived_suite(suite, budget: Budget) -> dict[str, Any]:
    """The sections of ``suite`` that the budget needs (perplexity and
    fidelity; tasks for an accuracy budget; calibration for the variants that
    calibrate), with data paths made absolute: no latency, no generation."""

    def corpus(spec) -> dict[str, Any]:
        data = spec.model_dump(mode="json")
        source = data["corpus"]["source"]
        if not source.startswith(("builtin:", "hf:")):
            data["corpus"]["source"] = str((Path(suite.root) / source).resolve())
        return data

    if suite.perplexity is None:
        raise QBenchError(f"suite '{suite.name}' has no perplexity section: the search scores KLD on its windows")
    out: dict[str, Any] = {
        "name": f"{suite.name}-search",
        "description": f"the sections of suite '{suite.name}' that `qbench search` needs",
        "bos": suite.bos,
        "task_bos": suite.task_bos,
        "perplexity": corpus(suite.perplexity),
        "fidelity": suite.fidelity.model_dump(mode="json"),
    }
    if suite.calibration is not None:
        out["calibration"] = corpus(suite.calibration)
    if suite.calibration_sets:
        out["calibration_sets"] = {name: corpus(spec) for name, spec in suite.calibration_sets.items()}
    if budget.metric == "acc":
        if not suite.tasks:
            raise QBenchError(f"budget '{budget.text}' needs tasks, and suite '{suite.name}' has no native tasks")
        out["tasks"] = [
            {**t.model_dump(mode="json"), "path": str((Path(suite.root) / t.path).resolve())} for t in suite.tasks
        ]
    return out


def cell_path(path: Path) -> str:
    """A recipe's path as it appears in its cell's name: relative to the
    working folder when inside it (readable tables), else absolute."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def pick_base(
    budget: Budget, uniform: list[Verdict], best: Optional[Verdict], configs: dict[str, Any]
) -> Optional[Verdict]:
    """The uniform variant a mixed recipe starts from: one that can mix
    (in ``configs``) and misses the budget (or, for a size budget, fits it),
    and, for a quality budget, is smaller than the best uniform answer; of
    those, the best in quality, which needs the fewest units upgraded."""
    mine = [v for v in uniform if v.cell in configs and v.error is None and v.weight_bytes is not None]
    if budget.is_size:
        pool = [v for v in mine if v.meets]
    else:
        pool = [v for v in mine if not v.meets and (best is None or v.weight_bytes < best.weight_bytes)]
    return min(pool, key=lambda v: quality_rank(v, budget)) if pool else None


def pick_upgrade(budget: Budget, uniform: list[Verdict], base: Verdict, configs: dict[str, Any]) -> Optional[str]:
    """What the most sensitive units become: for a quality budget, the
    smallest of the base backend's uniform variants that meets it; for a
    size budget, the best in quality of those better than the base. Only
    variants with the base's mix key (``VariantConfig.mix_key``) can mix
    with it; None (full precision) when none qualifies."""
    base_config = configs[base.cell]
    same = [
        v
        for v in uniform
        if v.cell in configs
        and v.cell != base.cell
        and v.error is None
        and CellSpec.parse(v.cell).backend == CellSpec.parse(base.cell).backend
        and configs[v.cell].mix_key() == base_config.mix_key()
    ]
    if budget.is_size:
        pool = sorted(
            (v for v in same if quality_rank(v, budget) < quality_rank(base, budget)),
            key=lambda v: quality_rank(v, budget),
        )
    else:
        pool = sorted((v for v in same if v.meets), key=lambda v: v.weight_bytes or float("inf"))
    return CellSpec.parse(pool[0].cell).variant_text if pool else None


def mixable(loaded, cells: list[CellSpec]) -> dict[str, Any]:
    """The cells whose variant can mix in a recipe (``VariantConfig.mix_key``
    is not None): cell -> its config."""
    configs = {c.cell: get_backend(loaded, c.backend).config_for(c.variant, c.settings) for c in cells}
    return {cell: config for cell, config in configs.items() if config.mix_key() is not None}


def run_search(
    budget_text: str,
    backends: Optional[list[str]],
    model: str,
    suite: str,
    device: str,
    unit: str,
    tokens: int,
    base: Optional[str],
    output_dir: Optional[str],
    run_id: Optional[str],
    reporter,
    on_step: Callable[[str], None] = lambda message: None,
) -> SearchResult:
    budget = Budget.parse(budget_text)
    if run_id is not None:
        check_run_id(run_id)
    folder = Path(output_dir or results_dir()) / (run_id or f"search-{new_run_id()}")
    device = resolve_device(device)
    source_suite = load_suite(str(suite_path(suite)))
    sens.check_settings(
        folder,
        {
            "budget": budget.text,
            "backends": backends,
            "model": model,
            "suite": source_suite.content_hash(),
            "device": device,
            "unit": unit,
            "tokens": tokens,
            "base": base,
        },
        SETTINGS_FILE,
        "a search",
    )
    with run_lock(folder):  # one process searches in a folder at a time
        return _search(
            budget, backends, model, suite, device, unit, tokens, base, folder, source_suite, reporter, on_step
        )


def _search(
    budget: Budget, backends, model, suite, device, unit, tokens, base, folder: Path, source_suite, reporter, on_step
) -> SearchResult:
    run_dir = folder / CELLS
    if (run_dir / PLAN_FILE).exists():
        plan, run_dir = resume_run(str(run_dir))
        on_step(f"resuming {run_dir}")
    else:
        write_atomic(folder / SUITE_FILE, yaml.safe_dump(derived_suite(source_suite, budget), sort_keys=False))
        plan, run_dir = create_run(
            model=model,
            suite=str(folder / SUITE_FILE),
            backends=backends,
            device=device,
            output_dir=str(folder),
            run_id=CELLS,
            allow_outside_data=True,
        )
    baseline_cell = next(c.cell for c in plan.cells if c.baseline)
    if budget.relative:  # its target is a fraction of the baseline's accuracy: that accuracy must mean something
        check_relative_items(source_suite, budget)
        execute(plan, run_dir, reporter, select=lambda cell: cell.baseline)
        check_relative_baseline(budget, ResultStore(run_dir).latest().get(baseline_cell))
    execute(plan, run_dir, reporter)
    loaded = load_plugins(PluginSettings.from_env(()))

    def records() -> dict[str, CellRecord]:
        return ResultStore(run_dir).latest()

    latest = records()
    uniform = [
        verdict_of(budget, latest[c.cell], latest.get(baseline_cell), "uniform")
        for c in plan.cells
        if not c.baseline and "recipe" not in c.settings and c.cell in latest
    ]
    path = list(uniform)
    best = best_of(budget, uniform)
    configs = mixable(loaded, [c for c in plan.cells if any(v.cell == c.cell for v in uniform)])
    mixers = sorted({c.backend for c in plan.cells if c.cell in configs}) or ["a backend that mixes variants"]
    base_verdict = (
        next((v for v in uniform if v.cell in configs and v.cell in (base, f"{mixers[0]}:{base}")), None)
        if base
        else pick_base(budget, uniform, best, configs)
    )
    if base and base_verdict is None:
        raise QBenchError(
            f"--base {base} is not among the searched variants that can mix in a recipe: add "
            f"-b {base if ':' in base else f'{mixers[0]}:{base}'}"
        )
    why = ""
    if base_verdict is None:
        sizes = ", ".join(
            f"{v.cell} {v.weight_bytes / 2**20:.1f} MiB" if v.weight_bytes else f"{v.cell} failed" for v in uniform
        )
        if budget.is_size:
            why = f"no variant that can mix ({', '.join(mixers)}) fits the size to start a mixed recipe from ({sizes})"
        elif best is None:
            why = f"no variant that can mix ({', '.join(mixers)}) ran to start a mixed recipe from ({sizes})"
        else:
            why = (
                f"no variant that can mix ({', '.join(mixers)}) and misses the budget is smaller than {best.cell} "
                f"({best.weight_bytes / 2**20:.1f} MiB), so no mixed recipe of them can be ({sizes}); "
                "--base VARIANT starts from one anyway"
            )
    else:
        base_spec = CellSpec.parse(base_verdict.cell)
        mixer, base_variant = base_spec.backend, base_spec.variant_text
        upgrade = pick_upgrade(budget, uniform, base_verdict, configs)
        on_step(
            f"mixed recipes from {base_verdict.cell}: its most sensitive {unit}s become {upgrade or 'full precision'}"
        )
        run_sensitivity(
            base_verdict.cell,
            model=model,
            suite=str(folder / SUITE_FILE),
            unit=unit,
            device=device,
            max_tokens=tokens,
            output_dir=str(folder),
            run_id=SENSITIVITY,
            allow_outside_data=True,  # the suite's own data, made absolute in derived_suite
            on_row=lambda row, done, total: on_step(
                f"sensitivity [{done}/{total}] {row.unit}: KLD {row.kld.value:.5f}"
            ),
        )
        ranked_units = [(row.unit, row.layers) for row in sens.ranked(sens.load_rows(folder / SENSITIVITY))]
        source = {
            "search": folder.name,
            "budget": budget.text,
            "sensitivity": str(folder / SENSITIVITY),
            "unit": unit,
            "tokens": tokens,
        }

        def evaluate(k: int) -> Verdict:
            recipe = keep_most_sensitive(mixer, base_variant, ranked_units, k, upgrade, source)
            file = write_recipe(recipe, folder / RECIPES / f"{base_variant}-{upgrade or 'keep'}-k{k}.yaml")
            # the recipe's rows keep the base row's KV cache: a memory@N budget counts it
            kept = {k: v for k, v in base_spec.settings.items() if k == "kv_cache"}
            spec = CellSpec(backend=mixer, settings={"recipe": cell_path(file), **kept})
            cell = spec.cell
            if not any(c.cell == cell for c in plan.cells):
                plan.cells.append(spec)
                save_plan(plan, run_dir)
            execute(plan, run_dir, reporter)
            latest = records()
            verdict = verdict_of(budget, latest[cell], latest.get(baseline_cell), "recipe", k)
            path.append(verdict)
            on_step(f"k={k}: {describe(verdict, budget)}")
            return verdict

        # Bisection over k. A quality budget: the fewest units upgraded that meet it (the base, k=0,
        # misses it; with every unit upgraded the model is the upgrade variant, which meets it, or full
        # precision). A size budget: the most that still fit (the base fits; everything upgraded does not).
        grow = budget.is_size
        lo, hi = 0, len(ranked_units)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if evaluate(mid).meets == grow:
                lo = mid
            else:
                hi = mid
    # The cost from what was measured (each cell's wall time, each unit's
    # scoring time), so a search finished over several invocations counts all of it.
    latest = records()
    spent = {
        "cells": sum(latest[c.cell].wall_seconds or 0.0 for c in plan.cells if c.cell in latest),
        "sensitivity": sum(row.seconds for row in sens.load_rows(folder / SENSITIVITY))
        if (folder / SENSITIVITY).is_dir()
        else 0.0,
    }
    chosen = best_of(budget, path)
    recipes = [v for v in path if v.kind == "recipe" and v.meets]
    if chosen is None:
        why = why or "no configuration meets the budget"
    elif chosen.kind == "recipe":
        why = (
            "the mixed recipe is smaller than every uniform variant meeting the budget"
            if not budget.is_size
            else "the mixed recipe has the best quality within the size"
        )
    elif not why:
        why = (
            "no mixed recipe meeting the budget is smaller than the best uniform variant"
            if recipes or not budget.is_size
            else "no mixed recipe within the size beats the best uniform variant"
        )
    result = SearchResult(
        budget=budget, path=path, chosen=chosen, best_uniform=best, why=why, seconds=spent, folder=str(folder)
    )
    write_atomic(folder / RESULT_FILE, result.model_dump_json(indent=1))
    return result


def best_of(budget: Budget, verdicts: list[Verdict]) -> Optional[Verdict]:
    """The answer among ``verdicts``: for a quality budget the smallest that
    meets it (ties: the better quality); for a size budget the best quality
    that fits."""
    meeting = [v for v in verdicts if v.meets and v.weight_bytes is not None]
    if not meeting:
        return None
    if budget.is_size:
        return min(meeting, key=lambda v: (quality_rank(v, budget), v.memory_bytes or v.weight_bytes))
    return min(meeting, key=lambda v: (v.weight_bytes, quality_rank(v, budget)))


def describe(verdict: Verdict, budget: Budget) -> str:
    size = f"{verdict.weight_bytes / 2**20:.1f} MiB" if verdict.weight_bytes else "size unknown"
    if verdict.memory_bytes is not None:
        size += f" of weights, {verdict.memory_bytes / 2**20:.1f} MiB with {budget.context} tokens of KV cache"
    if verdict.error:
        return f"{verdict.cell}: failed ({verdict.error})"
    figure = f"kld {verdict.kld:.5f} ± {Z * (verdict.kld_stderr or 0):.5f}" if verdict.kld is not None else ""
    if budget.metric == "acc":
        figure = f"acc {verdict.acc:.4f} ± {Z * (verdict.acc_stderr or 0):.4f}"
    return f"{size}, {figure}: {'meets' if verdict.meets else 'misses'} {budget.text}"
