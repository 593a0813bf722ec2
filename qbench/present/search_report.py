"""The report of a search (``qbench search``): its plot, and the section that
the report of its ``cells`` run carries (every configuration tried, the
answer and why, the sensitivity ranking with its heatmap)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from qbench.analyze import sensitivity as sens
from qbench.analyze.search import CELLS, PLOT_FILE, RESULT_FILE, SENSITIVITY, SearchResult, describe
from qbench.core.cells import CellSpec
from qbench.core.errors import QBenchError
from qbench.core.io import write_atomic
from qbench.metrics.registry import Z
from qbench.present.blocks import Block


def write_plot(result: SearchResult, path: Path) -> Optional[Path]:
    """Quality against weights for every configuration tried, the budget
    drawn, the chosen one circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "acc" if result.budget.metric == "acc" else "kld"
    # a memory@N budget is drawn against what it bounds: weights plus the KV cache at N tokens
    size = "memory_bytes" if result.budget.metric == "memory" else "weight_bytes"
    points = [v for v in result.path if getattr(v, size) and getattr(v, metric) is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("uniform", "s"), ("recipe", "o")):
        chosen = [v for v in points if v.kind == kind]
        if chosen:
            ax.errorbar(
                [getattr(v, size) / 2**20 for v in chosen],
                [getattr(v, metric) for v in chosen],
                yerr=[Z * (getattr(v, f"{metric}_stderr") or 0) for v in chosen],
                fmt=marker,
                label=f"{kind} ({len(chosen)})",
                capsize=3,
            )
    for v in points:
        label = CellSpec.parse(v.cell).variant_text if v.kind == "uniform" else f"k={v.k}"
        ax.annotate(
            label, (getattr(v, size) / 2**20, getattr(v, metric)), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    if result.budget.metric == "weights":
        ax.axvline(result.budget.bound / 2**20, color="grey", linestyle="--", label=result.budget.text)
    elif result.budget.metric == "memory":
        ax.axvline(result.budget.bound / 2**20, color="grey", linestyle="--", label=result.budget.text)
    else:
        ax.axhline(
            result.path[0].target if result.path else result.budget.bound,
            color="grey",
            linestyle="--",
            label=result.budget.text,
        )
    if result.chosen is not None and getattr(result.chosen, metric) is not None:
        ax.scatter(
            [getattr(result.chosen, size) / 2**20],
            [getattr(result.chosen, metric)],
            s=200,
            facecolors="none",
            edgecolors="red",
            label="chosen",
        )
    ax.set_xlabel(
        f"weights + KV cache at {result.budget.context} tokens (MiB)" if size == "memory_bytes" else "weights (MiB)"
    )
    ax.set_ylabel("KL divergence from the baseline (nats)" if metric == "kld" else "accuracy")
    if metric == "kld":
        ax.set_yscale("log")
    ax.set_title(f"qbench search: {result.budget.text}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda target: fig.savefig(target, dpi=110, format="png"))
    plt.close(fig)
    return path


def report_blocks(run_dir: Path) -> list:
    """The report's search section, for a run folder that is a search's
    ``cells``: every configuration tried, the answer and why, the plot, and
    the sensitivity ranking with its heatmap. Nothing for other runs."""
    folder = Path(run_dir).parent
    if Path(run_dir).name != CELLS or not (folder / RESULT_FILE).is_file():
        return []
    try:
        result = SearchResult.model_validate_json((folder / RESULT_FILE).read_text())
    except (ValidationError, UnicodeDecodeError):
        raise QBenchError(
            f"{folder / RESULT_FILE} is not the search result qbench wrote: rerun the search "
            f"(same --run-id) to write it again"
        ) from None
    budget = result.budget
    rows = tuple(
        (
            v.cell if v.kind == "uniform" else f"{v.cell} (k={v.k})",
            f"{v.weight_bytes / 2**20:.1f}" if v.weight_bytes else "-",
            f"{v.kld:.5f} ± {Z * (v.kld_stderr or 0):.5f}" if v.kld is not None else "-",
            f"{v.acc:.4f} ± {Z * (v.acc_stderr or 0):.4f}" if v.acc is not None else "-",
            f"{v.at_error_bar:.5g}" if v.at_error_bar is not None else (v.error or "-"),
            "yes" if v.meets else "no",
        )
        for v in result.path
    )
    answer = (
        f"Chosen: `{result.chosen.cell}`, {describe(result.chosen, budget)}; {result.why}."
        if result.chosen
        else f"Nothing meets `{budget.text}`: {result.why}."
    )
    out = [
        Block("h2", text=f"Search: {budget.text}"),
        Block(
            "p",
            text=f"Every configuration tried, in order (a bound must hold at the end of the 95% "
            f"interval, value ± 1.96 standard errors). {answer} Cost: "
            + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.seconds.items())
            + ".",
        ),
        Block(
            "table",
            headers=("configuration", "weights MiB", "KLD ± 95%", "acc ± 95%", "at the error bar", "meets"),
            rows=rows,
        ),
    ]
    if (folder / PLOT_FILE).is_file():
        out += [
            Block("img", text=PLOT_FILE, png=(folder / PLOT_FILE).read_bytes()),
            Block("p", text="Quality against weights for every configuration tried; the budget dashed."),
        ]
    ranking = sens.ranked(sens.load_rows(folder / SENSITIVITY)) if (folder / SENSITIVITY).is_dir() else []
    if ranking:
        out += [
            Block(
                "p",
                text=f"Sensitivity the recipes were built from (each unit quantized alone; the "
                f"{min(10, len(ranking))} most harmful of {len(ranking)}):",
            ),
            Block(
                "table",
                headers=("unit", "layers", "KLD ± 95%", "same top %"),
                rows=tuple(
                    (
                        r.unit,
                        str(len(r.layers)),
                        f"{r.kld.value:.5f} ± {Z * (r.kld.stderr or 0):.5f}",
                        f"{100 * r.same_top_p.value:.1f}",
                    )
                    for r in ranking[:10]
                ),
            ),
        ]
        heatmap = folder / SENSITIVITY / sens.HEATMAP_FILE
        if heatmap.is_file():
            out += [
                Block("img", text=sens.HEATMAP_FILE, png=heatmap.read_bytes()),
                Block("p", text="KLD of each layer quantized alone, block by layer type."),
            ]
    return out
