"""Reports, comparisons and exports of a finished run."""

import json
import math
import os
import re
import shutil
import statistics

import pandas as pd
import pytest

from qbench.execute.results import ResultStore
from qbench.present.compare import compare_records
from qbench.present.report import pareto_front, recommendation
from tests.conftest import FAKE_PLUGINS, make_record
from tests.test_cli import one_line_error, qbench


def record(cell, kld, weight, baseline=False, **extra):
    metrics = {"weight_bytes": {"value": weight, "unit": "bytes"},
               "decode_tokens_per_s": {"value": 10.0, "unit": "tokens/s"}}
    if kld is not None:
        metrics["kld"] = {"value": kld, "stderr": 0.001, "unit": "nats"}
    return make_record(cell=cell, baseline=baseline, metrics=metrics, **extra)


def test_pareto_front_and_budget_recommendation():
    records = [record("fp:fp32", None, 400, baseline=True), record("a", 0.01, 100), record("b", 0.005, 150),
               record("c", 0.02, 160), record("d", 0.5, 50)]
    assert [r.cell for r in pareto_front(records)] == ["d", "a", "b", "fp:fp32"]
    lines = recommendation(records, kld_budget=0.012)
    assert "`a`" in lines[1] and "25% of the baseline" in lines[1]
    assert "No variant" in recommendation(records, kld_budget=0.001)[1]
    # Without a baseline result nothing was measured against it: no "keep the baseline".
    failed = make_record(cell="fp:fp32", baseline=True, status="failed", error="boom")
    lines = recommendation([failed] + records[1:], kld_budget=0.012)
    assert len(lines) == 1 and "baseline has no result" in lines[0]


def timed(cell, kld, weight, decode, throughput8, baseline=False, **extra):
    metrics = {"weight_bytes": {"value": weight * 2**20, "unit": "bytes"},
               "decode_ms_per_token": {"value": decode, "unit": "ms"}}
    if kld is not None:
        metrics["kld"] = {"value": kld[0], "stderr": kld[1], "unit": "nats"}
    sweep = {1: {"decode_tokens_per_s": {"value": 1000 / decode, "unit": "tokens/s"}},
             8: {"decode_tokens_per_s": {"value": throughput8, "unit": "tokens/s"}}}
    backend, _, variant = cell.partition(":")
    return make_record(cell=cell, backend=backend, variant=variant, baseline=baseline, metrics=metrics,
                       latency_sweep=sweep, **extra)


def test_the_recommendation_weighs_quality_memory_and_speed():
    """A front over KLD, weights, batch-1 decode time and batch-8 throughput;
    the answers users ask, each within the budget at the error bar; each
    dominated row with what dominates it; launch-bound eager rows on CUDA."""
    from qbench.analyze.decisions import compiled_twins

    records = [timed("fp:fp32", None, 400, 10.0, 200, baseline=True),
               timed("q:a", (0.010, 0.001), 100, 8.0, 500),
               timed("q:b", (0.005, 0.001), 150, 4.0, 900),
               timed("q:c", (0.020, 0.001), 160, 9.0, 300),    # a and b are better on every axis
               timed("q:d", (0.500, 0.010), 50, 12.0, 150),
               timed("q:g", (0.0115, 0.001), 90, 30.0, 100)]   # 0.0115 meets 0.012, its upper bound 0.0135 does not
    lines = recommendation(records, kld_budget=0.012)
    assert lines[0] == ("Pareto-optimal on mean KLD, weight memory, decode time at batch 1, throughput at batch 8: "
                        "`q:d`, `q:g`, `q:a`, `q:b`, `fp:fp32`.")
    assert lines[1].startswith("Smallest within the quality budget (mean KLD ≤ 0.012 at its 95% upper bound): "
                               "`q:a`: 100.0 MiB (25% of the baseline's), KLD 0.0100 ± 0.0020 (95%), 8.00 ms/token "
                               "(1.25x the baseline's speed)")
    assert lines[2].startswith("Fastest at batch 1 within the budget: `q:b`: 150.0 MiB")
    assert lines[2].endswith("timed in one worker process, without an error bar: a small lead is not judged.")
    assert lines[3] == "Highest throughput at batch 8 within the budget: `q:b`: 900.0 tokens/s."
    assert lines[4] == "Dominated (another row is as good on every axis and better on one): `q:c` by `q:a`."
    cuda = dict(device="cuda")
    eager = timed("fp:bf16", (0.0001, 0.0), 200, 9.53, 100, config={"dtype": "bf16", "runtime": "eager"}, **cuda)
    compiled = timed("fp:bf16:runtime=compiled", (0.0001, 0.0), 200, 1.40, 700,
                     config={"dtype": "bf16", "runtime": "compiled", "compile_mode": "max-autotune"}, **cuda)
    assert compiled_twins([eager, compiled]) == {"fp:bf16": compiled}
    lines = recommendation(records + [eager, compiled], kld_budget=0.012)
    assert lines[-1] == ("`fp:bf16` is launch-bound: it decodes at 9.53 ms/token eager, its compiled twin "
                         "`fp:bf16:runtime=compiled` at 1.40; the eager time is Python launching kernels, not the "
                         "weights.")
    assert "`fp:bf16` by `fp:bf16:runtime=compiled`" in lines[-2]
    assert compiled_twins([eager.updated(device="cpu"), compiled]) == {}  # the CPU has no launch overhead to lose


def test_the_fastest_answer_names_the_rows_it_cannot_tell_apart():
    """A lead smaller than the 95% error bar of the difference is a tie:
    b (4.00 ± 0.05) and e (4.10 ± 0.05) differ by 0.10 < 1.96 * 0.0707;
    a (8.00) is far behind."""
    def with_error(record, se):
        record.metrics["decode_ms_per_token"].stderr = se
        return record

    records = [with_error(timed("fp:fp32", None, 400, 10.0, 200, baseline=True), 0.1),
               with_error(timed("q:a", (0.010, 0.001), 100, 8.0, 500), 0.05),
               with_error(timed("q:b", (0.005, 0.001), 150, 4.0, 900), 0.05),
               with_error(timed("q:e", (0.005, 0.001), 155, 4.1, 880), 0.05)]
    line = recommendation(records, kld_budget=0.012)[2]
    assert line.startswith("Fastest at batch 1 within the budget: `q:b`")
    assert line.endswith("; as fast within the error bar: `q:e` (4.10 ms/token).")
    records[3] = with_error(records[3], 0.01)
    records[3].metrics["decode_ms_per_token"].value = 4.2  # 0.20 > 1.96 * 0.051
    assert recommendation(records, kld_budget=0.012)[2].endswith("(2.50x the baseline's speed).")


def metric(value, stderr=None, samples=None):
    return {"value": value, "stderr": stderr, "unit": "x", **({"samples": samples} if samples else {})}


def test_compare_flags_only_changes_beyond_error_bars():
    def run(ppl, kld, decode):
        return {"x:y": make_record(cell="x:y", metrics={
            "perplexity": metric(ppl, 0.3), "kld": metric(kld, 0.001),
            "decode_ms_per_token": metric(decode, samples=[decode - 1, decode, decode + 1] * 10)})}

    _, rows, flagged = compare_records(run(14.0, 0.020, 30.0), run(14.2, 0.021, 31.0))
    assert flagged == 0 and len(rows) == 3
    _, rows, flagged = compare_records(run(14.0, 0.020, 30.0), run(14.0, 0.030, 40.0))
    assert flagged == 1  # the KLD; a one-process latency is shown, not judged
    assert {r[1] for r in rows if r[-1] == "YES"} == {"kld"}


def test_compare_judges_latency_by_repetition_and_not_when_the_machine_was_busy():
    def run(rep_medians, busy=False):
        # 3 new tokens: 2 decode gaps per repetition.
        samples = [g for m in rep_medians for g in (m - 0.5, m + 0.5)]
        return {"x:y": make_record(cell="x:y", latency_workload={"new_tokens": 3}, metrics={
            "decode_ms_per_token": metric(sorted(rep_medians)[len(rep_medians) // 2], samples=samples),
            "machine_canary_ms": {"value": 40.0 if busy else 20.0, "unit": "ms", "typical": 20.0, "busy": busy}})}

    # One worker process per run (trials: 1): shown with its repetitions' z,
    # never judged, whatever the change: one process's speed says little of
    # another's.
    _, rows, flagged = compare_records(run([30, 30.2, 29.8]), run([38, 38.2, 37.8]))
    assert flagged == 0 and float(rows[0][5]) > 10
    assert rows[0][-1].startswith("not judged (one worker process in run A and B")
    # A latency measured while the machine canary ran slow is not judged either.
    _, rows, flagged = compare_records(run([30, 30.2, 29.8]), run([60, 60.2, 59.8], busy=True))
    assert flagged == 0 and rows[0][-1] == "not judged (machine 100% slower than usual in run B)"


def test_compare_reports_how_far_the_machine_moved_but_judges_nothing_by_it():
    from qbench.present.compare import latency_spread

    def runs(ratios):
        def cell(decode):
            return make_record(metrics={"decode_ms_per_token": metric(decode, samples=[decode] * 8)},
                               latency_workload={"new_tokens": 3})
        a = {f"c{i}": cell(40.0) for i in range(len(ratios))}
        b = {f"c{i}": cell(40.0 * r) for i, r in enumerate(ratios)}
        return a, b

    # Ten single-process cells moving by up to 15% either way, one twice as slow.
    noise = [0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 0.92, 1.08, 2.0]
    a, b = runs(noise)
    sd, center, n = latency_spread(a, b)
    assert n == 10 and 0.05 < sd < 0.2 and abs(center) < 0.06
    assert compare_records(a, b)[2] == 0  # single-process latency is never a change
    assert latency_spread(*runs([1.0, 1.3])) is None  # too few figures to tell


def test_holm_keeps_the_family_wise_error_rate():
    from qbench.present.compare import holm, p_value

    # Sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, then 0.03 > 0.05/2 stops the procedure.
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert holm([0.04]) == [True] and holm([]) == []
    assert abs(p_value(1.959964) - 0.05) < 1e-6 and p_value(0.0) == 1.0


def _trial_cell(decode_trials, busy=False):
    from qbench.metrics.trials import combine_trials

    def trial(ms):
        return {"prefill_ms": {"value": 5 * ms, "unit": "ms", "samples": [5 * ms] * 3},
                "decode_ms_per_token": {"value": ms, "unit": "ms/token", "samples": [ms] * 9},
                "generate_ms": {"value": 40 * ms, "unit": "ms", "samples": [40 * ms] * 3},
                "latency_workload": {"batch_size": 1, "new_tokens": 4, "repetitions": 3},
                "machine_canary_ms": {"value": 40.0 if busy else 20.0, "unit": "ms", "typical": 20.0, "busy": busy}}

    return make_record(metrics=combine_trials([trial(ms) for ms in decode_trials]))


def test_compare_judges_latency_by_its_trials_pooled_across_cells():
    import random

    rng = random.Random(0)
    # Twenty cells whose worker processes differ by ~8% (SD); a cell measured
    # in bimodal processes (40 vs 73 ms) has a wide error of its own.
    def noisy(ms):
        return [ms * math.exp(rng.gauss(0, 0.08)) for _ in range(3)]

    a = {f"c{i}": _trial_cell(noisy(10 + 5 * i)) for i in range(20)}
    b = {f"c{i}": _trial_cell(noisy(10 + 5 * i)) for i in range(20)}
    a["bimodal"], b["bimodal"] = _trial_cell([40, 73, 40]), _trial_cell([40, 40, 41])
    _, rows, flagged = compare_records(a, b)
    assert flagged == 0, [r for r in rows if r[-1] == "YES"]
    b["c7"] = _trial_cell([ms * 1.5 for ms in noisy(45)])  # 50% slower in every process
    _, rows, flagged = compare_records(a, b)
    assert {(r[0], r[1]) for r in rows if r[-1] == "YES"} == {("c7", "prefill_ms"), ("c7", "decode_ms_per_token")}


def test_machine_canary_gates_latency_and_keeps_the_run_history(tmp_path, monkeypatch):
    from qbench.cell.worker import gated_latency
    from qbench.data.suites import LatencySpec
    from qbench.metrics import canary

    timings = iter([20.0, 21.0, 50.0, 52.0, 20.5, 20.0])  # before/after per attempt: 2nd attempt is slow
    monkeypatch.setattr(canary.MachineCanary, "measure", lambda self, repeats=9: next(timings))
    monkeypatch.setattr(canary, "PAUSE_SECONDS", 0.0)
    calls = []
    monkeypatch.setattr("qbench.metrics.cost.latency_metrics", lambda *a: calls.append(a) or {})
    canary.append_history(tmp_path / "machine_canary.json", "first", 20.0)
    spec = LatencySpec(prompt_tokens=4, new_tokens=3, warmup=0, min_reps=1, min_seconds=0)
    out = gated_latency(None, None, spec, tmp_path, "second")
    assert len(calls) == 1 and out["machine_canary_ms"]["attempts"] == 1 and not out["machine_canary_ms"]["busy"]
    out = gated_latency(None, None, spec, tmp_path, "third")
    assert len(calls) == 3 and out["machine_canary_ms"]["attempts"] == 2 and not out["machine_canary_ms"]["busy"]
    history = json.loads((tmp_path / "machine_canary.json").read_text())
    assert [h["cell"] for h in history] == ["first", "second", "third"]


def test_machine_canary_labels_no_idle_jitter_and_catches_a_machine_slow_throughout(tmp_path, monkeypatch):
    from qbench.cell.worker import gated_latency
    from qbench.data.suites import LatencySpec
    from qbench.metrics import canary

    monkeypatch.setattr(canary, "PAUSE_SECONDS", 0.0)
    monkeypatch.setattr("qbench.metrics.cost.latency_metrics", lambda *a: {})
    spec = LatencySpec(prompt_tokens=4, new_tokens=3, warmup=0, min_reps=1, min_seconds=0)

    def cell(name, readings, start=None):
        it = iter(readings)
        monkeypatch.setattr(canary.MachineCanary, "measure", lambda self, repeats=15: next(it))
        return gated_latency(None, None, spec, tmp_path, name, start)["machine_canary_ms"]

    # An idle 2-core machine's readings as seen in a smoke run: the first
    # cell's 'after' fell to 1.62 ms; the next read 2.08 / 2.31. Its history
    # figure is the median of its readings, and jitter on one side is no busy machine.
    first = cell("fp:fp32", [2.14, 1.62], start={"ms": 2.18})
    assert not first["busy"] and json.loads((tmp_path / "machine_canary.json").read_text())[0]["ms"] == 2.14
    second = cell("fp:bf16", [2.08, 2.31])
    assert not second["busy"] and second["attempts"] == 1 and second["ratio"] == pytest.approx(2.08 / 2.14, abs=1e-4)
    # A machine 40 % slower on both sides of every attempt is caught, after every retry.
    third = cell("slow", [3.0, 3.1] * canary.MAX_ATTEMPTS)
    assert third["busy"] and third["attempts"] == canary.MAX_ATTEMPTS
    assert third["ratio"] == pytest.approx(3.0 / statistics.median([2.14, (2.08 + 2.31) / 2]), abs=1e-3)


def test_the_canary_reads_the_lower_quartile_of_its_repetitions(monkeypatch):
    from qbench.metrics import canary

    assert canary.lower_quartile([5.0, 1.0, 2.0, 4.0, 3.0]) == 2.0 and canary.lower_quartile([7.0]) == 7.0
    times = iter([9.0] + [float(x) for x in range(15, 0, -1)])  # warm-up, then 15 .. 1
    monkeypatch.setattr(canary.MachineCanary, "_once", lambda self: next(times))
    assert canary.MachineCanary(matrices=1, rows=2, cols=2).measure() == 4.5


@pytest.fixture(scope="module")
def finished_run(tiny_model, tiny_suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code, stdout, err = qbench("run", "--model", str(tiny_model), "--suite", str(tiny_suite), "-b", "fp:bf16",
                               "-b", "fake:uniform", "--plugins-dir", str(FAKE_PLUGINS), "-o", str(out),
                               "--run-id", "r1", env={"QBENCH_RESULTS": str(out),
                                                      "QBENCH_CACHE": str(tmp_path_factory.mktemp("cache"))})
    assert code == 0, err
    return out / "r1", err


def test_run_writes_markdown_and_self_contained_html(finished_run):
    run_dir, stderr = finished_run
    assert "report:" in stderr and "time estimate" in stderr
    md = (run_dir / "report.md").read_text()
    for section in ("## Recommendation", "## Comparison", "## Plots", "## Environment and provenance"):
        assert section in md
    assert "| fake:uniform |" in md and "![quality_vs_memory.png](report_files/quality_vs_memory.png)" in md
    # How each row ran: the kernel and compute dtype the session reported.
    assert "| fp:bf16 | transformers (PyTorch) | bfloat16 | eager |" in md
    # The tiny suite times latency in one process per row, and says what that leaves out.
    assert "Latency: a 16-token prompt, 4 greedy new tokens (EOS ignored), batch 1" in md
    assert "in one worker process per row: no error bar covers" in md
    assert re.search(r"time outside backend calls\): \d+\.\d% over the run, ", md)
    for name in ("quality_vs_memory.png", "speed_vs_quality.png", "task_accuracy.png"):
        assert (run_dir / "report_files" / name).read_bytes().startswith(b"\x89PNG")
    page = (run_dir / "report.html").read_text()
    # Self-contained: plotly.js inline, nothing fetched from anywhere (the browser test loads it offline).
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # plotly.js holds URLs it never fetches here
    assert not re.search(r"""(src|href)=['"](?!data:)""", markup)
    assert page.count("class='chart'") == 3 and "Plotly.newPlot" in page


def test_export_csv_and_parquet(finished_run, tmp_path):
    run_dir, _ = finished_run
    code, _, err = qbench("export", str(run_dir), "--csv", str(tmp_path / "r.csv"),
                          "--parquet", str(tmp_path / "r.parquet"))
    assert code == 0, err
    csv, parquet = pd.read_csv(tmp_path / "r.csv"), pd.read_parquet(tmp_path / "r.parquet")
    assert list(csv.columns) == ["run_id", "cell", "task", "context", "metric", "value", "unit", "n", "stderr",
                                 "higher_is_better"]
    assert len(csv) == len(parquet) > 20
    # Each task's figures, one row per task and metric, beside the cell's own.
    record = next(r for r in ResultStore(run_dir).latest().values() if r.cell == "fake:uniform")
    task, figures = next(iter(record.tasks.items()))
    rows = csv[(csv.cell == "fake:uniform") & (csv.task == task)]
    assert set(rows.metric) == set(figures)
    assert rows[rows.metric == "acc"].value.iloc[0] == pytest.approx(figures["acc"].value)
    # the metric registry says which way is better: accuracy up, perplexity down
    assert bool(rows[rows.metric == "acc"].higher_is_better.iloc[0]) is True
    assert bool(csv[csv.metric == "perplexity"].higher_is_better.iloc[0]) is False
    ppl = csv[(csv.cell == "fake:uniform") & (csv.metric == "perplexity")]
    vocab = json.loads((run_dir / "plan.json").read_text())  # the tiny model's vocabulary, from its config
    assert ppl.value.iloc[0] == pytest.approx(
        json.loads((__import__("pathlib").Path(vocab["model"]["path"]) / "config.json").read_text())["vocab_size"])


def test_compare_two_runs_of_the_same_suite_flags_nothing(finished_run, tmp_path):
    run_dir, _ = finished_run
    copy = tmp_path / "r2"
    shutil.copytree(run_dir, copy)
    code, stdout, err = qbench("compare", str(run_dir), str(copy))
    assert code == 0, err
    assert "no change beyond noise" in err and "kld" in stdout


def test_compare_needs_shared_cells(finished_run, tmp_path):
    run_dir, _ = finished_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "results.jsonl").write_text("")
    shutil.copy(run_dir / "plan.json", tmp_path / "empty" / "plan.json")
    code, _, err = qbench("compare", str(run_dir), str(tmp_path / "empty"))
    assert code == 2 and "share no finished cells" in err


def test_suites_lists_shipped_suites_and_validates_files(tmp_path, tiny_model):
    code, stdout, _ = qbench("suites", "--json")
    listed = {s["suite"]: s for s in json.loads(stdout)}
    assert code == 0 and {"default", "smoke"} <= set(listed)
    assert listed["default"]["tasks (items)"] == "arithmetic (100), capitals (102), antonyms (100), agreement (120)"
    assert len(listed["default"]["hash"]) == 16
    code, stdout, _ = qbench("suites", "validate", "suites/smoke.yaml", "--model", str(tiny_model))
    assert code == 0 and "valid" in stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nperplexity:\n  max_tokens: -1\n")
    code, _, err = qbench("suites", "validate", str(bad), "--model", str(tiny_model))
    assert code == 2 and "bad.yaml" in err and "perplexity" in err


def _coloured_pixels(png, top, bottom) -> int:
    """Strongly coloured pixels in a band of rows: plot markers, lines and bars
    (text and table rules are grey)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(str(png))[top:bottom, :, :3]
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 0.35).sum())


def test_provenance_says_where_spread_cells_were_measured():
    from qbench.present.report import placement
    from tests.conftest import make_record

    def on(cell, **env):
        return make_record(cell=cell, env={"cpu": "Xeon", **env})

    assert placement([on("fp:fp32"), on("fp:bf16")]) == []  # one machine, one device: nothing to say
    assert placement([on("fp:fp32", cuda_visible_devices="0"), on("fp:bf16", cuda_visible_devices="1"),
                      on("bnb:nf4", cuda_visible_devices="0")]) == [
        "measured on: GPU 0: fp:fp32, bnb:nf4; GPU 1: fp:bf16"]
    lines = placement([on("fp:fp32", hostname="a", cuda_visible_devices="0", gpu={"name": "H200"}),
                       on("fp:bf16", hostname="b", cuda_visible_devices="0", gpu={"name": "H100"})])
    assert lines[0] == "measured on: node a GPU 0: fp:fp32; node b GPU 0: fp:bf16"
    assert "latency compares across them only roughly: a: Xeon, H200; b: Xeon, H100" in lines[1]


def test_a_row_computing_in_another_dtype_than_the_baseline_is_noted(builtin_backends):
    """Planned from the variants' settings, and said again from what each row
    recorded; rows whose library picks its dtype inside get no note."""
    from qbench.core.dtypes import cast_note
    from qbench.execute.runner import CellSpec, cast_notes
    from qbench.present.report import recorded_cast_notes
    from qbench.sdk.registry import LoadedPlugins

    assert cast_note("torch.float32", "torch.bfloat16", "fp:bf16") == (
        "computes in fp32, the baseline `fp:bf16` in bf16: its KLD includes that cast and its speed is not the "
        "quantization's alone (compare with fp:fp32)")
    assert cast_note("bfloat16", "bf16", "fp:bf16") is None and cast_note(None, "bf16", "fp:bf16") is None
    assert cast_note("bf16", "fp32", "fp:fp32", "fp:bf16") is None  # the row is the cast itself
    # 8-bit activations (llama.cpp, ONNX Runtime on the CPU) are the row's quantization, not a cast
    assert cast_note("int8 activations (q8_0 blocks), fp32 accumulation", "fp32", "fp:fp32", "gguf:q4_0") is None
    loaded = LoadedPlugins(pm=None, backends=builtin_backends)
    cells = [CellSpec(cell="fp:bf16", backend="fp", variant="bf16", baseline=True),
             CellSpec(cell="fp:fp32", backend="fp", variant="fp32"),
             CellSpec(cell="torchao:int8-wo", backend="torchao", variant="int8-wo"),
             CellSpec(cell="hqq:w4g64", backend="hqq", variant="w4g64"),
             CellSpec(cell="gguf:q4_0", backend="gguf", variant="q4_0")]
    assert cast_notes(loaded, cells, "cuda") == {}
    on_cpu = cast_notes(loaded, cells, "cpu")
    assert sorted(on_cpu) == ["hqq:w4g64", "torchao:int8-wo"]
    assert on_cpu["hqq:w4g64"].startswith("computes in fp32, the baseline `fp:bf16` in bf16")
    records = [make_record(cell="fp:bf16", baseline=True, session={"dtype": "torch.bfloat16"}),
               make_record(cell="torchao:int8-wo", session={"compute_dtype": "torch.float32"}),
               make_record(cell="bnb:nf4", session={"compute_dtype": "torch.bfloat16"}),
               make_record(cell="gguf:q4_0", session={})]
    assert list(recorded_cast_notes(records)) == ["torchao:int8-wo"]


def test_a_run_not_found_says_where_it_was_looked_for(tmp_path, monkeypatch):
    from qbench.core.errors import QBenchError
    from qbench.execute.results import find_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(QBenchError) as error:
        find_run("r1", root=tmp_path / "results")
    message = str(error.value)
    assert f"no plan.json in {tmp_path / 'r1'} and {tmp_path / 'results' / 'r1'}" in message
    assert "-o DIR lies in DIR/RUN_ID" in message


def test_table_shows_lm_evals_main_figure_and_the_metrics_asked_for():
    from qbench.core.errors import QBenchError
    from qbench.present.table import table_rows

    def m(value, unit="lm-eval"):
        return {"value": value, "unit": unit, "n": 100, "stderr": 0.01}

    record = make_record(metrics={"perplexity": m(12.5, "ppl"), "word_perplexity": m(40.25, "ppl"),
                                  "bits_per_byte": m(0.96381832, "bits/byte")},
                         tasks={"lm_eval:arc_easy": {"acc": m(0.5), "acc_norm": m(0.625)}})
    headers, rows = table_rows([record])
    # lm-eval's main figure, as lm-eval prints it, joins the default columns.
    assert headers[-1] == "lm_eval:arc_easy acc_norm" and rows[0][-1] == "0.6250 ± 0.0100"
    assert "word PPL" not in headers
    headers, rows = table_rows([record], "+word_perplexity,+bits_per_byte")
    assert headers[-2:] == ["word PPL", "bits/byte"] and rows[0][-2:] == ["40.250", "0.96382"]
    headers, rows = table_rows([record], "lm_eval:arc_easy/acc,kld")
    # Exactly the columns asked for, an empty one kept.
    assert headers == ["variant", "status", "lm_eval:arc_easy acc", "KLD"] and rows[0][2:] == ["0.5000 ± 0.0100", "-"]
    with pytest.raises(QBenchError, match="no metric bogus in this run; it has: perplexity, word_perplexity"):
        table_rows([record], "bogus")
    with pytest.raises(QBenchError, match="either every name has a leading"):
        table_rows([record], "+kld,acc")


def test_show_and_report_take_metrics(finished_run, tmp_path):
    run_dir = tmp_path / "r1"
    shutil.copytree(finished_run[0], run_dir)
    code, stdout, err = qbench("show", str(run_dir), "--markdown", "--metrics", "+word_perplexity,+byte_perplexity")
    assert code == 0, err
    header = stdout.splitlines()[0]
    assert "| word PPL | byte PPL |" in header and "| KLD |" in header
    code, _, err = qbench("show", str(run_dir), "--metrics", "nonsense")
    assert code != 0 and "no metric nonsense in this run" in err
    code, _, err = qbench("report", str(run_dir), "--metrics", "kld,bits_per_byte")
    assert code == 0, err
    md = (run_dir / "report.md").read_text()
    assert "| variant | status | KLD | bits/byte |" in md
    # What the windows held: the protocol and the BOS used, in the provenance and beside "How each row ran".
    assert "perplexity: protocol stream, " in md and "BOS: none" in md
    assert "the bit width; every row's perplexity windows: protocol stream, BOS: none):" in md


def test_a_missing_dependency_is_named_and_the_run_kept(finished_run, tmp_path):
    """plotly missing (seen on a GPU machine installed without dependencies):
    one line naming the module and the fix, not "a qbench bug"; the records stay."""
    run_dir = tmp_path / "r1"
    shutil.copytree(finished_run[0], run_dir)
    before = (run_dir / "results.jsonl").read_bytes()
    shadow = tmp_path / "shadow" / "plotly"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'plotly'\", name='plotly')\n")
    code, _, err = qbench("report", str(run_dir), env={"PYTHONPATH": str(shadow.parent)})
    assert code == 2
    assert one_line_error(err) == (
        "error: this command needs the Python module 'plotly', which is not installed: reinstall qbench with its "
        "dependencies (`pip install qbench`, or `make run` in a checkout); records already measured are kept")
    assert (run_dir / "results.jsonl").read_bytes() == before


def chromium() -> str:
    """Debian's chromium (or $QBENCH_CHROMIUM): Playwright drives it instead of a browser of its own download."""
    found = os.environ.get("QBENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium to drive: apt install chromium (.ci/run does), or set QBENCH_CHROMIUM")
    return found


def test_html_report_in_a_browser_hovers_hides_sorts_and_needs_no_network(finished_run, tmp_path):
    """report.html in a real browser, offline: the comparison table has every
    row and sorts by a clicked column, a chart's point shows the row's figures
    on hover, a legend click hides the row, and nothing is fetched."""
    from playwright.sync_api import sync_playwright

    run_dir, _ = finished_run
    records = list(ResultStore(run_dir).latest().values())
    fetched = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def offline(route):
            if route.request.url.startswith(("file:", "data:")):
                return route.continue_()
            fetched.append(route.request.url)
            return route.abort()

        page.route("**/*", offline)
        page.goto((run_dir / "report.html").as_uri())
        page.wait_for_selector(".plotly-graph-div .scatterlayer .point")

        table = page.locator("table.sortable").first
        assert table.locator("tbody tr").count() == len(records)
        headers = table.locator("th").all_inner_texts()
        kld = headers.index("KLD")

        def column(index):
            return [row.locator("td").nth(index).inner_text() for row in table.locator("tbody tr").all()]

        table.locator("th").nth(kld).click()
        assert table.locator("th").nth(kld).get_attribute("aria-sort") == "ascending"
        values = column(kld)
        numbers = [float(v.split(" ")[0]) for v in values if v != "-"]
        assert numbers == sorted(numbers) and values[len(numbers):] == ["-"] * (len(values) - len(numbers))
        table.locator("th").nth(kld).click()
        numbers = [float(v.split(" ")[0]) for v in column(kld) if v != "-"]
        assert numbers == sorted(numbers, reverse=True) and len(numbers) >= 2

        chart = page.locator(".plotly-graph-div").first
        # The mouse over the second row's point (the first row is the baseline,
        # which has no KLD); plotly's drag layer lies on top: move, not element.hover.
        chart.scroll_into_view_if_needed()
        box = chart.locator(".scatterlayer .trace").nth(1).locator(".point").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_selector(".hoverlayer .hovertext")
        tip = page.locator(".hoverlayer .hovertext").first.text_content()
        assert records[1].cell in tip and "KLD" in tip and "weights MiB" in tip

        chart.locator(".legend .traces").first.click()
        page.wait_for_function("document.querySelector('.plotly-graph-div').data[0].visible === 'legendonly'")

        # Drawn, not blank: the chart's marks are coloured (text and table rules are grey).
        drawn = tmp_path / "chart.png"
        chart.screenshot(path=str(drawn))
        assert _coloured_pixels(drawn, 0, 10_000) > 300
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
    assert fetched == []
    if os.environ.get("QBENCH_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["QBENCH_KEEP_SCREENSHOT"])


def test_a_smaller_kv_cache_is_an_axis_of_the_front_once_a_row_quantizes_it():
    """A row that trades quality for a smaller cache is not 'dominated' by
    its full-cache twin: the front weighs the cache's bytes per position."""
    from qbench.analyze.decisions import KV, axes_for, pareto

    def row(cell, kld, kv, kind="full"):
        metrics = {"weight_bytes": {"value": 100.0, "unit": "bytes"},
                   "kv_bytes_per_token": {"value": kv, "unit": "bytes"}}
        if kld is not None:
            metrics["kld"] = {"value": kld, "stderr": 0.0001, "unit": "nats"}
        backend, _, variant = cell.partition(":")
        return make_record(cell=cell, backend=backend, variant=variant, baseline=kld is None, metrics=metrics,
                           config={"kv_cache": kind})

    full, half = row("q:a", 0.010, 4096), row("q:a:kv_cache=int8", 0.012, 2048, "int8")
    base = row("fp:fp32", None, 8192)
    assert KV not in axes_for([base, full])  # no row quantizes its cache: the axis says nothing
    axes = axes_for([base, full, half])
    assert KV in axes
    front, dominated = pareto([base, full, half], axes)
    assert {r.cell for r in front} == {"fp:fp32", "q:a", "q:a:kv_cache=int8"} and not dominated
    worse = row("q:a:kv_cache=int4", 0.020, 4096, "int4")  # worse quality, no smaller cache: dominated
    assert pareto([base, full, half, worse], axes_for([base, full, half, worse]))[1]["q:a:kv_cache=int4"].cell == "q:a"
