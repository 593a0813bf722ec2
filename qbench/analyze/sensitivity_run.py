"""A sensitivity pass from the user's options (``qbench sensitivity``), and the
recipe that keeps its most harmful units in higher precision. The pass's rows
are appended one line per unit, so a killed pass resumes where it stopped."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from qbench.analyze import sensitivity as sens
from qbench.core.cells import CellSpec
from qbench.core.environment import resolve_device
from qbench.core.errors import QBenchError
from qbench.core.paths import results_dir
from qbench.data.suites import load_suite, suite_path
from qbench.execute.results import check_output, run_lock
from qbench.execute.runner import check_run_id, new_run_id
from qbench.sdk.hf import load_tokenizer
from qbench.sdk.models import DEFAULT_MODEL, resolve_model
from qbench.sdk.recipes import keep_most_sensitive, write_recipe
from qbench.sdk.registry import PluginSettings, get_backend, load_plugins

if TYPE_CHECKING:
    import pandas as pd


def recipe_from_sensitivity(
    folder: str | Path, variant: str, top: int, use: Optional[str], path: str | Path, force: bool = False
) -> Path:
    """A recipe from a sensitivity pass: ``variant`` (``backend:variant``,
    the pass's) with its ``top`` most harmful units kept in full precision,
    or quantized as ``use``. Checked like any recipe before it is written;
    an existing ``path`` is replaced only with ``force``."""
    rows = sens.ranked(sens.load_rows(Path(folder)))
    if not rows:
        raise QBenchError(f"{folder} holds no sensitivity rows to build a recipe from")
    spec = CellSpec.parse(variant)
    recipe = keep_most_sensitive(
        spec.backend,
        spec.variant_text,
        [(r.unit, r.layers) for r in rows],
        top,
        use,
        {"sensitivity": str(folder), "mode": rows[0].mode},
    )
    target = write_recipe(recipe, check_output(path, force))
    backend = get_backend(load_plugins(PluginSettings.from_env(())), spec.backend)
    try:
        backend.config_for(None, {"recipe": str(target)})  # the overrides' variants exist and can mix with the base
    except QBenchError:
        target.unlink()
        raise
    return target


def run_sensitivity(
    variant: str,
    model: str = DEFAULT_MODEL,
    suite: str = "default",
    unit: str = "type",
    mode: str = "only",
    device: str = "auto",
    max_tokens: int = 1024,
    output_dir: Optional[str] = None,
    run_id: Optional[str] = None,
    trust_remote_code: bool = False,
    on_row=None,
    allow_outside_data: bool = False,
) -> tuple[pd.DataFrame, Path]:
    """``qbench sensitivity``: each unit of ``variant`` (``backend:variant``)
    quantized alone (``mode="only"``) or left out (``"all-but"``), scored
    against the fp32 baseline on the suite's perplexity windows. Returns the
    ranked rows (most harmful first) and the folder holding
    ``sensitivity.jsonl``, the baseline's reference and the heatmap. Rerun
    with the same ``run_id`` to finish an interrupted pass."""
    if mode not in sens.MODES:
        raise QBenchError(f"unknown mode '{mode}': choose one of {', '.join(sens.MODES)}")
    if unit not in sens.UNIT_KINDS:
        raise QBenchError(f"unknown unit '{unit}': choose one of {', '.join(sens.UNIT_KINDS)}")
    if max_tokens < 1:
        raise QBenchError(f"--tokens must be at least 1 (got {max_tokens})")
    loaded = load_plugins(PluginSettings.from_env(()))
    try:
        cell = CellSpec.parse(variant)
    except QBenchError:  # a backend alone: name one of its variants
        named = get_backend(loaded, variant.strip(" :")).variants()
        raise QBenchError(
            f"name one variant for sensitivity, like '{variant.strip(' :')}:{next(iter(named))}'"
        ) from None
    backend = get_backend(loaded, cell.backend)
    device = resolve_device(device)
    config = backend.config_for(cell.variant, cell.settings)
    availability = backend.variant_available(config, device)
    if not availability.ok:
        raise QBenchError(f"{variant} cannot run on {device}: {availability.reason}")
    config = backend.for_device(config, device)  # as a run's worker does: settings the device decides, filled in
    spec = resolve_model(model, trust_remote_code=trust_remote_code)
    suite_obj = load_suite(str(suite_path(suite)), allow_outside_data=allow_outside_data)
    if suite_obj.perplexity is None:
        raise QBenchError(f"suite '{suite_obj.name}' has no perplexity section: sensitivity scores its windows")
    if run_id is not None:
        check_run_id(run_id)
    folder = Path(output_dir or results_dir()) / (run_id or f"sensitivity-{new_run_id()}")
    sens.check_not_a_run(folder, "a sensitivity pass")  # before minutes of loading the model
    quantizer = backend.layer_quantizer(spec.path, config, device, trust_remote_code)
    sens.check_settings(
        folder,
        {
            "variant": variant,
            "settings": config.settings(),
            "model": spec.fingerprint,
            "suite": suite_obj.content_hash(),
            "unit": unit,
            "mode": mode,
            "max_tokens": max_tokens,
            "device": device,
        },
    )
    with run_lock(folder):  # one process appends a pass's rows at a time
        return _measure_sensitivity(
            variant, spec, suite_obj, device, max_tokens, trust_remote_code, on_row, quantizer, folder, unit, mode
        )


def _measure_sensitivity(
    variant, spec, suite_obj, device, max_tokens, trust_remote_code, on_row, quantizer, folder, unit, mode
) -> tuple[pd.DataFrame, Path]:
    unit_layers = sens.units(quantizer.layers(), unit)
    scorer = sens.Scorer(
        folder,
        spec.path,
        suite_obj,
        load_tokenizer(spec.path, trust_remote_code),
        device,
        max_tokens,
        trust_remote_code,
    )
    rows = sens.load_rows(folder)

    def keep(row) -> None:
        with open(folder / sens.ROWS_FILE, "a") as handle:  # one line per unit: a kill loses at most that unit
            handle.write(row.model_dump_json() + "\n")
        rows.append(row)
        if on_row:
            on_row(row, len(rows), len(unit_layers))

    sens.measure(quantizer, scorer, unit_layers, mode, {r.unit for r in rows}, keep)
    ordered = sens.ranked(rows)
    which = "only this layer" if mode == "only" else "all but this layer"
    sens.write_heatmap(ordered, folder / sens.HEATMAP_FILE, f"{variant}: KLD with {which} quantized")
    import pandas as pd

    table = pd.DataFrame(
        [
            {
                "unit": r.unit,
                "layers": len(r.layers),
                "mode": r.mode,
                "kld": r.kld.value,
                "kld_stderr": r.kld.stderr,
                "same_top_p": r.same_top_p.value,
                "same_top_p_stderr": r.same_top_p.stderr,
                "ln_ppl_ratio": r.ln_ppl_ratio.value,
                "seconds": r.seconds,
            }
            for r in ordered
        ]
    )
    return table, folder
