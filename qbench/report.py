"""Publishable reports of a run: ``report.md`` (GitHub-ready, plots beside it
as PNG files) and ``report.html`` (self-contained: plots inlined, no network
needed). Both are rendered from one list of blocks, so they say the same.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from qbench.decisions import QUALITY, WEIGHTS, pareto, quality, recommend
from qbench.errors import QBenchError
from qbench.records import CellRecord
from qbench.io import write_atomic
from qbench.table import markdown_rows, md_text, table_rows

if TYPE_CHECKING:
    from qbench.runner import RunPlan

MIB = 2**20
#: Default quality budget of the recommendation: mean KLD to the baseline.
DEFAULT_KLD_BUDGET = 0.02


@dataclass
class Block:
    kind: str  # "h2" | "p" | "list" | "table" | "img"
    text: str = ""
    items: tuple = ()
    headers: tuple = ()
    rows: tuple = ()
    png: bytes = b""


def _value(record: CellRecord, name: str) -> Optional[float]:
    return record.value(name)


def _stderr(record: CellRecord, name: str) -> Optional[float]:
    return record.stderr(name)


def pareto_front(records: list[CellRecord]) -> list[CellRecord]:
    """Cells no other cell beats on both weight memory and KLD: the 2-D
    front the quality-against-memory plot draws (the recommendation's front
    adds the speed axes, see qbench.decisions)."""
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
        cells.append(f"{100 * math.expm1(ratio):+.2f} ± {100 * math.exp(ratio) * se:.2f}"
                     if ratio is not None and se is not None else "-")
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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plots(records: list[CellRecord]) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG) for each plot that has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok and quality(r) is not None]
    out = []
    if ok and any(_value(r, "weight_bytes") for r in ok):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in ok:
            ax.errorbar(_value(r, "weight_bytes") / MIB, quality(r), yerr=_stderr(r, "kld") or 0, fmt="o")
            ax.annotate(r.cell, (_value(r, "weight_bytes") / MIB, quality(r)), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        front = pareto_front(ok)
        ax.plot([_value(r, "weight_bytes") / MIB for r in front], [quality(r) for r in front], "--",
                color="tab:red", label="Pareto front")
        ax.set_xlabel("weight memory (MiB)")
        ax.set_ylabel("mean KLD to the baseline (symlog)")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.legend()
        ax.grid(alpha=0.3)
        out.append(("quality_vs_memory.png", "Quality (KLD, lower is better) against weight memory; "
                    "the dashed line joins the Pareto-optimal variants.", _png(fig)))
    speed = [r for r in ok if _value(r, "decode_tokens_per_s")]
    if speed:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in speed:
            ax.errorbar(quality(r), _value(r, "decode_tokens_per_s"), yerr=_stderr(r, "decode_tokens_per_s") or 0,
                        fmt="o")
            ax.annotate(r.cell, (quality(r), _value(r, "decode_tokens_per_s")), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=1e-4)
        ax.set_xlabel("mean KLD to the baseline (symlog)")
        ax.set_ylabel("decode tokens/s (bars: between-process SE)")
        ax.grid(alpha=0.3)
        out.append(("speed_vs_quality.png", "Decode speed against quality (up and left is better).", _png(fig)))
    swept = [r for r in records if r.ok and len(r.latency_sweep) > 1]
    if swept:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in swept:
            sizes = sorted(r.latency_sweep)
            ax.plot(sizes, [r.latency_sweep[b]["decode_tokens_per_s"].value for b in sizes], "o-", label=r.cell)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s (all sequences)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
        out.append(("throughput_vs_batch.png", "Decode throughput against batch size, per variant.", _png(fig)))
    tasks = sorted({t for r in ok for t, figures in r.tasks.items() if "acc" in figures})
    if tasks:
        fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(tasks) * max(1, len(ok)) / 3), 4.5))
        width = 0.8 / len(ok)
        colours = plt.get_cmap("tab20").colors
        for i, r in enumerate(ok):
            per = r.tasks
            xs = [j + i * width for j in range(len(tasks))]
            ys = [100 * per[t]["acc"].value if t in per else float("nan") for t in tasks]
            es = [100 * (per[t]["acc"].stderr or 0) if t in per else 0 for t in tasks]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=r.cell, color=colours[i % len(colours)])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
        ax.set_ylabel("accuracy % (± standard error)")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        ax.grid(axis="y", alpha=0.3)
        out.append(("task_accuracy.png", "Accuracy per task, with standard errors.", _png(fig)))
    return out


def blocks(plan: RunPlan, records: list[CellRecord], kld_budget: float, extra: tuple[Block, ...] = ()) -> list[Block]:
    out = [Block("p", text=f"Model `{plan.model.name}` (fingerprint {plan.model.fingerprint}), suite "
                 f"`{plan.suite_name}` (hash {plan.suite_hash}), device {plan.device}, run "
                 f"`{plan.run_id}` started {time.strftime('%Y-%m-%d %H:%M', time.localtime(plan.created))}.")]
    if plan.model.note:
        out.append(Block("p", text=plan.model.note + "."))
    out += [Block("h2", text="Recommendation"), Block("list", items=tuple(recommendation(records, kld_budget)))]
    headers, rows = table_rows(records)
    out += [Block("h2", text="Comparison"), Block("table", headers=tuple(headers), rows=tuple(map(tuple, rows)))]
    latency = latency_method(records)
    if latency:
        out.append(Block("p", text=latency))
    d_headers, d_rows = delta_rows(records)
    if d_rows:
        out += [Block("p", text="Against the baseline (paired standard error for perplexity; independent for "
                      "accuracy):"), Block("table", headers=d_headers, rows=tuple(d_rows))]
    per_task = task_rows(records)
    if per_task:
        out += [Block("p", text="Per task, every figure as its engine reports it (qbench's own multiple-choice "
                      "scorer, or lm-evaluation-harness for `lm_eval:` tasks), ± standard error:"),
                Block("table", headers=("task", "metric", "n", *[r.cell for r in records if r.ok]),
                      rows=tuple(per_task))]
    sweep = sweep_rows(records)
    if sweep:
        out += [Block("p", text="Batch sweep (each batch size timed in the row's own worker process; weight-only "
                      "kernels that win at batch 1 can lose at larger batches):"),
                Block("table", headers=("variant", "batch", "prefill ms", "decode ms/step", "tokens/s",
                                        "BW % of peak"), rows=tuple(sweep))]
    ran = kernel_rows(records)
    if ran:
        out += [Block("p", text="How each row ran (speed depends on the kernel as much as on the bit width):"),
                Block("table", headers=("variant", "kernel", "compute dtype", "runtime", "calibration", "library"),
                      rows=tuple(ran))]
    failed = [f"`{r.cell}`: {r.error}" for r in records if not r.ok]
    skipped = [f"`{cell}` (skipped): {why}" for cell, why in plan.skipped.items()]
    if failed or skipped:
        out += [Block("h2", text="Cells without results"), Block("list", items=tuple(failed + skipped))]
    notes = [f"`{r.cell}`: {n}" for r in records for n in r.notes] + \
        [f"`{cell}`: {note}" for cell, note in recorded_cast_notes(records).items()]
    if notes:
        out += [Block("h2", text="Notes"), Block("list", items=tuple(notes))]
    out += list(extra)
    out.append(Block("h2", text="Plots"))
    for name, caption, png in plots(records):
        out += [Block("img", text=name, png=png), Block("p", text=caption)]
    out += [Block("h2", text="Environment and provenance"), Block("list", items=tuple(provenance(plan, records)))]
    return out


def latency_method(records: list[CellRecord]) -> Optional[str]:
    """How the latency columns were measured, from the records."""
    work = next((r.latency_workload for r in records if r.ok and r.latency_workload), None)
    if not work:
        return None
    trials = work.get("trials", 1)
    how = (f"in {trials} worker processes per row: geometric mean of the processes' medians ± its standard error "
           f"(speed differs more between processes than between repetitions)" if trials > 1 else
           "in one worker process per row: no error bar covers the process-to-process variation")
    text = (f"Latency: a {work['prompt_tokens']}-token prompt, {work['new_tokens']} greedy new tokens (EOS ignored), "
            f"batch {work['batch_size']}, {work['warmup']} warm-up run(s), measured {how}.")
    peak = next((r.metrics["peak_bandwidth_bytes_per_s"] for r in records if r.ok
                 and "peak_bandwidth_bytes_per_s" in r.metrics), None)
    if peak is not None:
        text += (f" BW % of peak: the bytes a decode step reads (weights as held, plus the KV cache at the mean "
                 f"context) over the time per step, as a share of this run's measured copy bandwidth, "
                 f"{peak.value / 1e9:.0f} GB/s (read + write).")
    return text


def task_rows(records: list[CellRecord]) -> list[tuple]:
    """One row per task and metric, one column per finished cell."""
    ok = [r for r in records if r.ok]
    keys = sorted({(task, name) for r in ok for task, figures in r.tasks.items() for name in figures})
    rows = []
    for task, name in keys:
        cells, n = [], "-"
        for r in ok:
            m = r.tasks.get(task, {}).get(name)
            if m is None or m.value is None:
                cells.append("-")
                continue
            n = str(m.n) if m.n is not None else n
            cells.append(f"{m.value:.4f}" + (f" ± {m.stderr:.4f}" if m.stderr is not None else ""))
        rows.append((task, name, n, *cells))
    return rows


def sweep_rows(records: list[CellRecord]) -> list[tuple]:
    rows = []
    for r in records:
        if not r.ok or len(r.latency_sweep) < 2:
            continue
        for batch, m in sorted(r.latency_sweep.items()):
            bw = m.get("roofline_fraction")
            rows.append((r.cell, str(batch), f"{m['prefill_ms'].value:.1f}", f"{m['decode_ms_per_token'].value:.2f}",
                         f"{m['decode_tokens_per_s'].value:.1f}", f"{100 * bw.value:.1f}" if bw else "-"))
    return rows


def recorded_dtype(record: CellRecord) -> Optional[str]:
    """The dtype a row's session said it computes in, if it said."""
    session = record.session or {}
    return session.get("compute_dtype") or session.get("dtype")


def recorded_cast_notes(records: list[CellRecord]) -> dict[str, str]:
    """Rows that computed in another dtype than the baseline, from their records."""
    from qbench.dtypes import cast_note

    base = next((r for r in records if r.baseline and r.ok), None)
    if base is None:
        return {}
    notes = {r.cell: cast_note(recorded_dtype(r), recorded_dtype(base), base.cell, r.cell)
             for r in records if r.ok and not r.baseline}
    return {cell: note for cell, note in notes.items() if note}


def kernel_rows(records: list[CellRecord]) -> list[tuple]:
    rows = []
    for r in records:
        if not r.ok:
            continue
        session = r.session or {}
        dtype = recorded_dtype(r) or ""
        compiled = r.metrics.get("compile_seconds")
        runtime = (r.config or {}).get("runtime", "eager") + (f" (compiled in {compiled.value:.0f} s)"
                                                              if compiled is not None else "")
        calibration = f"{r.calibration.name} ({r.calibration.samples} samples)" if r.calibration else "-"
        rows.append((r.cell, session.get("kernel") or "transformers (PyTorch)", str(dtype).removeprefix("torch."),
                     runtime, calibration, r.backend_version or ""))
    return rows


def provenance(plan: RunPlan, records: list[CellRecord]) -> list[str]:
    env = next((r.env for r in records if r.env), None)
    items = [f"model: {plan.model.source} `{plan.model.path}`, fingerprint {plan.model.fingerprint}",
             f"suite: `{plan.suite_path}`, hash {plan.suite_hash}"]
    if plan.suite_files:
        items.append("suite data files (sha256): " + ", ".join(f"`{p}` {h}" for p, h in plan.suite_files.items()))
    calib = sorted({r.calibration.hash for r in records if r.calibration})
    if calib:
        items.append("calibration data hash: " + ", ".join(calib))
    workload = next((r.workload for r in records if r.workload), None)
    if workload:
        items.append(f"BOS policy: {workload.get('bos_policy')}; perplexity tokens: "
                     f"{workload.get('perplexity_tokens')}")
    if env is None:
        return items + ["environment: not recorded (no cell finished)"]
    gpu = env.get("gpu")
    items.append(f"hardware: {env.get('cpu')} ({env.get('cpu_count_logical')} logical CPUs, "
                 f"{(env.get('memory_total_bytes') or 0) / 2**30:.0f} GiB)" + (f", GPU {gpu.get('name')}" if gpu else "")
                 + f"; torch threads {env.get('torch_threads')}")
    items.append(f"software: Python {env.get('python')}, " + ", ".join(
        f"{k} {v}" for k, v in sorted((env.get("packages") or {}).items())))
    items += placement(records)
    shares = [(r.metrics["harness_share"], _value(r, "harness_share")) for r in records
              if _value(r, "harness_share") is not None]
    if shares:
        outside = sum(m.get("seconds", 0.0) for m, _ in shares)
        inside = sum(m.get("backend_seconds", 0.0) for m, _ in shares)
        whole = f"{100 * outside / (outside + inside):.1f}% over the run, " if outside + inside else ""
        items.append(f"harness share of the measurement phases (time outside backend calls): {whole}"
                     f"{100 * min(v for _, v in shares):.1f}–{100 * max(v for _, v in shares):.1f}% across cells")
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
        items.append("nodes' hardware differs, so latency compares across them only roughly: "
                     + "; ".join(f"{node}: {what}" for node, what in hardware.items()))
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


def to_html(title: str, body: list[Block]) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
           "text-align:right}td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#f6f6f6}"
           "code{background:#f0f0f0;padding:0 3px}img{max-width:100%}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for b in body:
        if b.kind == "h2":
            out.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.headers) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                                 for row in b.rows) + "</table>")
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode()
            out.append(f"<img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: Path, kld_budget: float = DEFAULT_KLD_BUDGET) -> tuple[Path, Path]:
    """Write report.md (+ report_files/*.png) and report.html into the run folder."""
    from qbench.results import ResultStore
    from qbench.runner import load_plan

    plan = load_plan(run_dir)
    records = list(ResultStore(run_dir).latest().values())
    if not any(r.ok for r in records):
        raise QBenchError(f"run {plan.run_id} has no finished cell yet: nothing to report; finish it with "
                          f"`qbench run --resume {plan.run_id}`")
    title = f"qbench report: {plan.model.name} on suite {plan.suite_name}"
    from qbench.search import report_blocks

    body = blocks(plan, records, kld_budget, tuple(report_blocks(run_dir)))
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
        raise QBenchError(f"cannot write the report into {run_dir} ({exc.strerror or exc}): free space or fix the "
                          "folder's permissions, then run `qbench report` again (the records are untouched)") from None
    return md, page
