"""Publishable reports of a run: ``report.md`` (GitHub-ready, plots beside it
as PNG files) and ``report.html`` (self-contained: plots inlined, no network
needed). Both are rendered from one list of blocks, so they say the same.
"""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from qbench.analyze.decisions import (
    QUALITY,
    WEIGHTS,
    context_figure,
    longest_context,
    pareto,
    quality,
    quality_axis,
    recommend,
    total_axis,
)
from qbench.core.errors import QBenchError
from qbench.core.io import write_atomic
from qbench.core.records import CellRecord
from qbench.metrics.registry import info
from qbench.present.blocks import Block
from qbench.present.charts import Chart, Series, plotly_div, plotly_script, png
from qbench.present.search_report import report_blocks
from qbench.present.table import markdown_rows, md_text, table_rows

if TYPE_CHECKING:
    from qbench.execute.runner import RunPlan

MIB = 2**20
#: Default quality budget of the recommendation: mean KLD to the baseline.
DEFAULT_KLD_BUDGET = 0.02


def _value(record: CellRecord, name: str) -> Optional[float]:
    return record.value(name)


def _stderr(record: CellRecord, name: str) -> Optional[float]:
    return record.stderr(name)


def pareto_front(records: list[CellRecord]) -> list[CellRecord]:
    """Cells no other cell beats on both weight memory and KLD: the 2-D
    front the quality-against-memory plot draws (the recommendation's front
    adds the speed axes, see qbench.analyze.decisions)."""
    return pareto(records, [QUALITY, WEIGHTS])[0]


def recommendation(records: list[CellRecord], kld_budget: float) -> list[str]:
    return recommend(records, kld_budget)


def delta_rows(records: list[CellRecord]) -> tuple[tuple, list[tuple]]:
    """Changes against the baseline, with their error bars."""
    base = next((r for r in records if r.baseline and r.ok), None)
    headers = ("variant", "Δ PPL %", "Δ acc (points)", "weights vs base", "decode speed vs base")
    rows = []
    for r in records:
        if not r.ok or r.baseline or base is None:
            continue
        cells = [r.cell]
        ratio, se = _value(r, "ln_ppl_ratio"), _stderr(r, "ln_ppl_ratio")
        # ln(PPL_q/PPL_base) has a paired SE; map it to a percentage change.
        cells.append(
            f"{100 * math.expm1(ratio):+.2f} ± {100 * math.exp(ratio) * se:.2f}"
            if ratio is not None and se is not None
            else "-"
        )
        acc, acc_b = _value(r, "acc"), _value(base, "acc")
        if acc is not None and acc_b is not None:
            se = math.hypot(_stderr(r, "acc") or 0, _stderr(base, "acc") or 0)
            cells.append(f"{100 * (acc - acc_b):+.1f} ± {100 * se:.1f}")
        else:
            cells.append("-")
        w, w_b = _value(r, "weight_bytes"), _value(base, "weight_bytes")
        cells.append(f"{w / w_b:.2f}×" if w and w_b else "-")
        t, t_b = _value(r, "decode_tokens_per_s"), _value(base, "decode_tokens_per_s")
        if t and t_b:
            # Relative errors add in quadrature; shown when both rows had trials.
            se_t, se_b = _stderr(r, "decode_tokens_per_s"), _stderr(base, "decode_tokens_per_s")
            spread = f" ± {t / t_b * math.hypot(se_t / t, se_b / t_b):.2f}" if se_t and se_b else ""
            cells.append(f"{t / t_b:.2f}×{spread}")
        else:
            cells.append("-")
        rows.append(tuple(cells))
    return headers, rows


def _hover(r: CellRecord) -> str:
    """A row's figures, for the interactive charts' hover."""
    parts = [f"<b>{html.escape(r.cell)}</b>"]
    for name in ("kld", "perplexity", "weight_bytes", "decode_ms_per_token", "decode_tokens_per_s", "acc"):
        value, se, m = _value(r, name), _stderr(r, name), info(name)
        if value is not None:
            parts.append(f"{m.label} {value * m.scale:{m.fmt}}" + (f" ± {se * m.scale:{m.fmt}}" if se else ""))
    return "<br>".join(parts)


def charts(records: list[CellRecord]) -> list[Chart]:
    """Each chart that has data, drawn as PNG for report.md and interactively
    for report.html."""
    ok = [r for r in records if r.ok and quality(r) is not None]
    out = []
    if ok and any(_value(r, "weight_bytes") for r in ok):
        rows = [r for r in ok if _value(r, "weight_bytes")]
        front = sorted(pareto_front(rows), key=lambda r: _value(r, "weight_bytes"))
        out.append(
            Chart(
                "quality_vs_memory.png",
                "Quality (KLD, lower is better) against weight memory; the dashed line joins "
                "the variants no other beats on both.",
                "weight memory (MiB)",
                "mean KLD to the baseline",
                [
                    Series(
                        r.cell, [_value(r, "weight_bytes") / MIB], [quality(r)], [_stderr(r, "kld") or 0], [_hover(r)]
                    )
                    for r in rows
                ]
                + [
                    Series(
                        "Pareto front",
                        [_value(r, "weight_bytes") / MIB for r in front],
                        [quality(r) for r in front],
                        guide=True,
                    )
                ],
                y_scale="symlog",
            )
        )
    speed = [r for r in ok if _value(r, "decode_tokens_per_s")]
    if speed:
        out.append(
            Chart(
                "speed_vs_quality.png",
                "Decode speed against quality (up and left is better).",
                "mean KLD to the baseline",
                "decode tokens/s (bars: between-process SE)",
                [
                    Series(
                        r.cell,
                        [quality(r)],
                        [_value(r, "decode_tokens_per_s")],
                        [_stderr(r, "decode_tokens_per_s") or 0],
                        [_hover(r)],
                    )
                    for r in speed
                ],
                x_scale="symlog",
            )
        )
    swept = [r for r in records if r.ok and len(r.latency_sweep) > 1]
    if swept:
        series = []
        for r in swept:
            sizes = sorted(r.latency_sweep)
            speeds = [r.latency_sweep[b]["decode_tokens_per_s"].value for b in sizes]
            series.append(
                Series(
                    r.cell,
                    sizes,
                    speeds,
                    lines=True,
                    hover=[
                        f"<b>{html.escape(r.cell)}</b><br>batch {b}: {t:.1f} tokens/s" for b, t in zip(sizes, speeds)
                    ],
                )
            )
        out.append(
            Chart(
                "throughput_vs_batch.png",
                "Decode throughput against batch size, per variant.",
                "batch size",
                "decode tokens/s (all sequences)",
                series,
                x_scale="log2",
                y_scale="log",
            )
        )
    out += context_charts(records)
    tasks = tuple(sorted({t for r in ok for t, figures in r.tasks.items() if "acc" in figures}))
    if tasks:
        series = []
        for r in ok:
            have = [t for t in tasks if t in r.tasks and "acc" in r.tasks[t]]
            accs = [r.tasks[t]["acc"] for t in have]
            series.append(
                Series(
                    r.cell,
                    [100 * m.value for m in accs],
                    list(have),
                    [100 * (m.stderr or 0) for m in accs],
                    [
                        f"<b>{html.escape(r.cell)}</b><br>{html.escape(t)}: {100 * m.value:.1f} ± "
                        f"{100 * (m.stderr or 0):.1f} % (n {m.n})"
                        for t, m in zip(have, accs)
                    ],
                )
            )
        out.append(
            Chart(
                "task_accuracy.png",
                "Accuracy per task, ± standard error.",
                "accuracy %",
                "task",
                series,
                categories=tasks,
            )
        )
    return out


def context_charts(records: list[CellRecord]) -> list[Chart]:
    """Long context: KLD against context length, one line per weight x cache
    row; and total memory (weights + KV) at the longest context against the
    KLD there, with its front."""
    swept = [r for r in records if r.ok and len(r.context_sweep) > 1]
    out = []
    lines = []
    for r in swept:  # the baseline too, at 0: each row keeps its colour from chart to chart
        points = [(n, *context_figure(r, n, "kld")) for n in sorted(r.context_sweep)]
        points = [p for p in points if p[1] is not None]
        if points:
            lines.append(
                Series(
                    r.cell,
                    [p[0] for p in points],
                    [p[1] for p in points],
                    [p[2] for p in points],
                    [f"<b>{html.escape(r.cell)}</b><br>{n} tokens: KLD {k:.5f} ± {e:.5f}" for n, k, e in points],
                    lines=True,
                )
            )
    if lines:
        out.append(
            Chart(
                "kld_vs_context.png",
                "Quality against context length (KLD to the baseline on windows of each length, lower is "
                "better), one line per weights x KV cache row.",
                "context length (tokens)",
                "mean KLD to the baseline",
                lines,
                x_scale="log2",
                y_scale="symlog",
            )
        )
    length = longest_context(swept)
    if length is not None:
        total, kld = total_axis(length), quality_axis(length)
        front = sorted(pareto(swept, [kld, total])[0], key=total.read)
        out.append(
            Chart(
                "memory_at_context_vs_quality.png",
                f"Quality against total memory at {length} tokens (weights + one sequence's KV cache); the "
                "dashed line joins the rows no other beats on both.",
                f"weights + KV at {length} tokens (MiB)",
                f"mean KLD at {length} tokens",
                [
                    Series(
                        r.cell,
                        [total.read(r) / MIB],
                        [kld.read(r)],
                        [context_figure(r, length, "kld")[1]],
                        [
                            f"<b>{html.escape(r.cell)}</b><br>{total.read(r) / MIB:.1f} MiB at {length} tokens"
                            f"<br>KLD {kld.read(r):.5f}"
                        ],
                    )
                    for r in swept
                ]
                + [
                    Series(
                        "Pareto front", [total.read(r) / MIB for r in front], [kld.read(r) for r in front], guide=True
                    )
                ],
                y_scale="symlog",
            )
        )
    return out


def context_rows(records: list[CellRecord]) -> list[tuple]:
    """The context sweep: each row's figures at each context length."""
    names = ("perplexity", "ln_ppl_ratio", "kld", "same_top_p", "kv_bytes", "total_bytes", "prefill_ms",
             "decode_ms_per_token")  # fmt: skip
    rows = []
    for r in records:
        if not r.ok or len(r.context_sweep) < 2:
            continue
        for length, figures in sorted(r.context_sweep.items()):
            cells = [r.cell, str(length)]
            for name in names:
                m, spec = figures.get(name), info(name)
                if m is None or m.value is None:
                    cells.append("-")
                    continue
                text = f"{m.value * spec.scale:{spec.fmt}}"
                if spec.show_stderr and m.stderr:
                    text += f" ± {m.stderr * spec.scale:{spec.fmt}}"
                cells.append(text)
            rows.append(tuple(cells))
    return rows


CONTEXT_HEADERS = ("variant", "context", "PPL", "ln(PPL/base)", "KLD", "same top %", "KV MiB", "weights+KV MiB",
                   "prefill ms", "decode ms/tok")  # fmt: skip


def captioned(text: str, headers: tuple, rows: list[tuple], sortable: bool = False) -> list[Block]:
    """A table with its caption above it; nothing when it has no rows."""
    if not rows:
        return []
    return [Block("p", text=text), Block("table", headers=tuple(headers), rows=tuple(rows), sortable=sortable)]


def blocks(
    plan: RunPlan,
    records: list[CellRecord],
    kld_budget: float,
    extra: tuple[Block, ...] = (),
    metrics: Optional[str] = None,
) -> list[Block]:
    out = [
        Block(
            "p",
            text=f"Model `{plan.model.name}` (fingerprint {plan.model.fingerprint}), suite "
            f"`{plan.suite_name}` (hash {plan.suite_hash}), device {plan.device}, run "
            f"`{plan.run_id}` started {time.strftime('%Y-%m-%d %H:%M', time.localtime(plan.created))}.",
        )
    ]
    if plan.model.note:
        out.append(Block("p", text=plan.model.note + "."))
    out += [Block("h2", text="Recommendation"), Block("list", items=tuple(recommendation(records, kld_budget)))]
    headers, rows = table_rows(records, metrics)
    out += [
        Block("h2", text="Comparison"),
        Block("table", headers=tuple(headers), rows=tuple(map(tuple, rows)), sortable=True),
        Block("p", text="± is one standard error; the recommendation's error bars are 95% intervals."),
    ]
    recorded = {r.cell for r in records}
    unrun = [c.cell for c in plan.cells if c.cell not in recorded]
    if unrun:  # a stopped run's report says so where the table is read
        out.append(
            Block(
                "p",
                text=f"{len(unrun)} of {len(plan.cells)} planned cells did not run: "
                + ", ".join(f"`{c}`" for c in unrun)
                + f" (`qbench run --resume {plan.run_id}` runs them).",
            )
        )
    latency = latency_method(records)
    if latency:
        out.append(Block("p", text=latency))
    d_headers, d_rows = delta_rows(records)
    out += captioned(
        "Against the baseline (paired standard error for perplexity; independent for accuracy):", d_headers, d_rows
    )
    t_headers, per_task = task_rows(records)
    out += captioned(
        "Per task, every figure as its engine reports it (qbench's own multiple-choice scorer, or "
        "lm-evaluation-harness for `lm_eval:` tasks), ± standard error:",
        t_headers,
        per_task,
        sortable=True,
    )
    out += captioned(
        "Batch sweep (each batch size timed in the row's own worker process; weight-only kernels that win at "
        "batch 1 can lose at larger batches):",
        ("variant", "batch", "prefill ms", "decode ms/step", "tokens/s", "BW % of peak"),
        sweep_rows(records),
    )
    out += captioned(
        "By context length (quality on windows of each length against the baseline's on the same windows; "
        "memory for one sequence that long; speed after a prompt that long):",
        CONTEXT_HEADERS,
        context_rows(records),
        sortable=True,
    )
    ran = kernel_rows(records)
    if ran:
        workload = next((r.workload for r in records if r.workload), None) or {}
        scored = (
            f"; every row's perplexity windows: protocol {workload['perplexity_protocol']}, BOS: "
            f"{workload.get('perplexity_bos') or 'suite policy ' + str(workload.get('bos_policy'))}"
            if workload.get("perplexity_protocol")
            else ""
        )
        out += [
            Block("p", text=f"How each row ran (speed depends on the kernel as much as on the bit width{scored}):"),
            Block(
                "table",
                headers=("variant", "kernel", "compute dtype", "runtime", "calibration", "library"),
                rows=tuple(ran),
            ),
        ]
    failed = [f"`{r.cell}`: {r.error}" for r in records if not r.ok]
    never = [f"`{cell}` (not run): the run stopped before it" for cell in unrun]
    skipped = [f"`{cell}` (skipped): {why}" for cell, why in plan.skipped.items()]
    if failed or never or skipped:
        out += [Block("h2", text="Cells without results"), Block("list", items=tuple(failed + never + skipped))]
    notes = [f"`{r.cell}`: {n}" for r in records for n in r.notes] + [
        f"`{cell}`: {note}" for cell, note in recorded_cast_notes(records).items()
    ]
    if notes:
        out += [Block("h2", text="Notes"), Block("list", items=tuple(notes))]
    out += list(extra)
    out.append(Block("h2", text="Plots"))
    for chart in charts(records):
        out += [Block("img", text=chart.file, png=png(chart), chart=chart), Block("p", text=chart.caption)]
    out += [Block("h2", text="Environment and provenance"), Block("list", items=tuple(provenance(plan, records)))]
    return out


def latency_method(records: list[CellRecord]) -> Optional[str]:
    """How the latency columns were measured, from the records."""
    work = next((r.latency_workload for r in records if r.ok and r.latency_workload), None)
    if not work:
        return None
    trials = work.get("trials", 1)
    how = (
        f"in {trials} worker processes per row: geometric mean of the processes' medians ± its standard error "
        f"(speed differs more between processes than between repetitions)"
        if trials > 1
        else "in one worker process per row: no error bar covers the process-to-process variation"
    )
    text = (
        f"Latency: a {work['prompt_tokens']}-token prompt, {work['new_tokens']} greedy new tokens (EOS ignored), "
        f"batch {work['batch_size']}, {work['warmup']} warm-up run(s), measured {how}."
    )
    peak = next(
        (
            r.metrics["peak_bandwidth_bytes_per_s"]
            for r in records
            if r.ok and "peak_bandwidth_bytes_per_s" in r.metrics
        ),
        None,
    )
    if peak is not None:
        text += (
            f" BW % of peak: the bytes a decode step reads (weights as held, plus the KV cache at the mean "
            f"context) over the time per step, as a share of this run's measured copy bandwidth, "
            f"{peak.value / 1e9:.0f} GB/s (read + write)."
        )
    return text


def task_rows(records: list[CellRecord]) -> tuple[tuple, list[tuple]]:
    """One row per finished cell, one column per task and metric (its n in
    the header): rows grow with variants, the table's width only with tasks."""
    ok = [r for r in records if r.ok]
    keys = sorted({(task, name) for r in ok for task, figures in r.tasks.items() for name in figures})
    if not keys:  # a suite without tasks: no table of one empty column
        return ("variant",), []
    headers = ["variant"]
    for task, name in keys:
        ns = {m.n for r in ok if (m := r.tasks.get(task, {}).get(name)) is not None and m.n is not None}
        headers.append(f"{task} {name}" + (f" (n {ns.pop()})" if len(ns) == 1 else ""))
    rows = []
    for r in ok:
        cells = [r.cell]
        for task, name in keys:
            m = r.tasks.get(task, {}).get(name)
            cells.append(
                "-"
                if m is None or m.value is None
                else f"{m.value:.4f}" + (f" ± {m.stderr:.4f}" if m.stderr is not None else "")
            )
        rows.append(tuple(cells))
    return tuple(headers), rows


def sweep_rows(records: list[CellRecord]) -> list[tuple]:
    rows = []
    for r in records:
        if not r.ok or len(r.latency_sweep) < 2:
            continue
        for batch, m in sorted(r.latency_sweep.items()):
            bw = m.get("roofline_fraction")
            rows.append(
                (
                    r.cell,
                    str(batch),
                    f"{m['prefill_ms'].value:.1f}",
                    f"{m['decode_ms_per_token'].value:.2f}",
                    f"{m['decode_tokens_per_s'].value:.1f}",
                    f"{100 * bw.value:.1f}" if bw else "-",
                )
            )
    return rows


def recorded_dtype(record: CellRecord) -> Optional[str]:
    """The dtype a row's session said it computes in, if it said."""
    session = record.session or {}
    return session.get("compute_dtype") or session.get("dtype")


def recorded_cast_notes(records: list[CellRecord]) -> dict[str, str]:
    """Rows that computed in another dtype than the baseline, from their records."""
    from qbench.core.dtypes import cast_note

    base = next((r for r in records if r.baseline and r.ok), None)
    if base is None:
        return {}
    notes = {
        r.cell: cast_note(recorded_dtype(r), recorded_dtype(base), base.cell, r.cell)
        for r in records
        if r.ok and not r.baseline
    }
    return {cell: note for cell, note in notes.items() if note}


def kernel_rows(records: list[CellRecord]) -> list[tuple]:
    rows = []
    for r in records:
        if not r.ok:
            continue
        session = r.session or {}
        dtype = recorded_dtype(r) or ""
        compiled = r.metrics.get("compile_seconds")
        runtime = (r.config or {}).get("runtime", "eager") + (
            f" (compiled in {compiled.value:.0f} s)" if compiled is not None else ""
        )
        calibration = f"{r.calibration.name} ({r.calibration.samples} samples)" if r.calibration else "-"
        rows.append(
            (
                r.cell,
                session.get("kernel") or "transformers (PyTorch)",
                str(dtype).removeprefix("torch."),
                runtime,
                calibration,
                r.backend_version or "",
            )
        )
    return rows


def provenance(plan: RunPlan, records: list[CellRecord]) -> list[str]:
    env = next((r.env for r in records if r.env), None)
    items = [
        f"model: {plan.model.source} `{plan.model.path}`, fingerprint {plan.model.fingerprint}",
        f"suite: `{plan.suite_path}`, hash {plan.suite_hash}",
    ]
    if plan.suite_files:
        items.append("suite data files (sha256): " + ", ".join(f"`{p}` {h}" for p, h in plan.suite_files.items()))
    calib = sorted({r.calibration.hash for r in records if r.calibration})
    if calib:
        items.append("calibration data hash: " + ", ".join(calib))
    workload = next((r.workload for r in records if r.workload), None)
    if workload:
        if workload.get("perplexity_protocol"):
            # Records before the BOS was written out in words give the suite's policy.
            bos = workload.get("perplexity_bos") or f"suite policy {workload.get('bos_policy')}"
            items.append(
                f"perplexity: protocol {workload['perplexity_protocol']}, "
                f"{workload.get('perplexity_tokens')} tokens scored, BOS: {bos}"
            )
        else:
            items.append(f"BOS policy: {workload.get('bos_policy')}")
    if env is None:
        return items + ["environment: not recorded (no cell finished)"]
    gpu = env.get("gpu")
    items.append(
        f"hardware: {env.get('cpu')} ({env.get('cpu_count_logical')} logical CPUs, "
        f"{(env.get('memory_total_bytes') or 0) / 2**30:.0f} GiB)"
        + (f", GPU {gpu.get('name')}" if gpu else "")
        + f"; torch threads {env.get('torch_threads')}"
    )
    items.append(
        f"software: Python {env.get('python')}, "
        + ", ".join(f"{k} {v}" for k, v in sorted((env.get("packages") or {}).items()))
    )
    items += placement(records)
    shares = [
        (r.metrics["harness_share"], _value(r, "harness_share"))
        for r in records
        if _value(r, "harness_share") is not None
    ]
    if shares:
        outside = sum(m.get("seconds", 0.0) for m, _ in shares)
        inside = sum(m.get("backend_seconds", 0.0) for m, _ in shares)
        whole = f"{100 * outside / (outside + inside):.1f}% over the run, " if outside + inside else ""
        items.append(
            f"harness share of the measurement phases (time outside backend calls): {whole}"
            f"{100 * min(v for _, v in shares):.1f}–{100 * max(v for _, v in shares):.1f}% across cells"
        )
    items.append(f"qbench git commit: {env.get('git_commit')}")
    return items


def placement(records: list[CellRecord]) -> list[str]:
    """Where the cells were measured, when a run was spread (``--gpus``, Ray):
    cells grouped by node and GPU, each node's hardware when they differ."""
    groups: dict[str, list[str]] = {}
    hardware: dict[str, str] = {}
    for record in records:
        env = record.env or {}
        node = env.get("hostname") or ""
        gpu = env.get("cuda_visible_devices")
        where = " ".join(part for part in (f"node {node}" if node else "", f"GPU {gpu}" if gpu else "") if part)
        if where:
            groups.setdefault(where, []).append(record.cell)
            hardware[node] = f"{env.get('cpu')}" + (f", {env['gpu'].get('name')}" if env.get("gpu") else "")
    if len(groups) < 2 and not any(k.startswith("node") for k in groups):
        return []
    items = ["measured on: " + "; ".join(f"{where}: {', '.join(cells)}" for where, cells in groups.items())]
    if len(set(hardware.values())) > 1:
        items.append(
            "nodes' hardware differs, so latency compares across them only roughly: "
            + "; ".join(f"{node}: {what}" for node, what in hardware.items())
        )
    return items


def to_markdown(title: str, body: list[Block]) -> str:
    """GitHub-ready markdown; every text through ``md_text``, since names in
    it come from suite and task files that others wrote."""
    lines = [f"# {md_text(title)}", ""]
    for b in body:
        if b.kind == "h2":
            lines += [f"## {md_text(b.text)}", ""]
        elif b.kind == "p":
            lines += [md_text(b.text), ""]
        elif b.kind == "list":
            lines += [f"- {md_text(item)}" for item in b.items] + [""]
        elif b.kind == "table":
            lines += markdown_rows(list(b.headers), [list(r) for r in b.rows]) + [""]
        elif b.kind == "img":
            lines += [f"![{b.text}](report_files/{b.text})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    # `code` spans are the only markup the blocks use.
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


#: Sorts a table.sortable by the clicked header: numbers by value ("1.23 ± 0.04" by 1.23), text
#: alphabetically, "-" and failures last; a second click reverses. aria-sort says the order.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.querySelectorAll("th");
  heads.forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var text = row.cells[col].textContent.trim(), num = parseFloat(text.replace(/,/g, ""));
        return isNaN(num) ? text : num;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), xs = typeof x === "string", ys = typeof y === "string";
        if (x === "-" || y === "-") { return (x === "-") - (y === "-"); }
        if (xs !== ys) { return xs ? 1 : -1; }
        var order = xs ? x.localeCompare(y) : x - y;
        return asc ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    ".scroll{overflow-x:auto;margin:1em 0}table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}"
    "td:first-child,th:first-child{text-align:left;position:sticky;left:0;background:#fff}"
    "tr:nth-child(even) td{background:#f6f6f6}table.sortable th{cursor:pointer;user-select:none}"
    "th[aria-sort=ascending]::after{content:' \\25B2'}th[aria-sort=descending]::after{content:' \\25BC'}"
    "code{background:#f0f0f0;padding:0 3px}img{max-width:100%}.chart{margin:1em 0}"
)


def to_html(title: str, body: list[Block]) -> str:
    """One self-contained page: plotly.js and every image inline, so it
    opens offline and can be mailed or attached as one file."""
    charts_in = [b for b in body if b.chart is not None]
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
    ]
    if charts_in:
        out.append(f"<script>{plotly_script()}</script>")
    out += ["</head><body>", f"<h1>{html.escape(title)}</h1>"]
    for index, b in enumerate(body):
        if b.kind == "h2":
            out.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            out.append(
                "<div class='scroll'><table"
                + (" class='sortable'" if b.sortable else "")
                + "><thead><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
                + "</tbody></table></div>"
            )
        elif b.kind == "img" and b.chart is not None:
            out.append(f"<div class='chart'>{plotly_div(b.chart, f'chart-{index}')}</div>")
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode()
            out.append(f"<img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>")
    if any(b.sortable for b in body):
        out.append(f"<script>{SORT_SCRIPT}</script>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(
    run_dir: Path, kld_budget: float = DEFAULT_KLD_BUDGET, metrics: Optional[str] = None
) -> tuple[Path, Path]:
    """Write report.md (+ report_files/*.png) and report.html into the run folder;
    ``metrics`` picks the comparison table's columns (see ``table.select_columns``)."""
    from qbench.execute.results import ResultStore
    from qbench.execute.runner import load_plan

    plan = load_plan(run_dir)
    records = list(ResultStore(run_dir).latest().values())
    if not any(r.ok for r in records):
        raise QBenchError(
            f"run {plan.run_id} has no finished cell yet: nothing to report; finish it with "
            f"`qbench run --resume {plan.run_id}`"
        )
    title = f"qbench report: {plan.model.name} on suite {plan.suite_name}"
    body = blocks(plan, records, kld_budget, tuple(report_blocks(run_dir)), metrics)
    files = run_dir / "report_files"
    md, page = run_dir / "report.md", run_dir / "report.html"
    try:
        files.mkdir(exist_ok=True)
        for b in body:
            if b.kind == "img":
                write_atomic(files / b.text, b.png)
        write_atomic(md, to_markdown(title, body))
        write_atomic(page, to_html(title, body))
    except OSError as exc:
        raise QBenchError(
            f"cannot write the report into {run_dir} ({exc.strerror or exc}): free space or fix the "
            "folder's permissions, then run `qbench report` again (the records are untouched)"
        ) from None
    return md, page
