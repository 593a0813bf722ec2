"""What a default command costs, counted as work rather than timed: the
smoke suite must stay a first try of a few minutes on a 2-core CPU."""

import pytest

from qbench.data.suites import load_suite, suite_path


def smoke_work(suite) -> dict[str, int]:
    """Tokens each cell pushes through its model, by phase (forward passes
    of one token count once; a prompt counts its length)."""
    spec = suite.latency
    batches = spec.batch_sizes
    per_pass = spec.prompt_tokens + spec.new_tokens
    return {
        "perplexity": suite.perplexity.max_tokens,
        "tasks": sum(task.limit or 0 for task in suite.tasks) * 64,  # a choice prompt is well under 64 tokens
        "generation": len(suite.generation.prompts) * (suite.generation.max_new_tokens + 16),
        "latency": sum(batches) * per_pass * (spec.warmup + spec.min_reps) * spec.trials,
    }


def test_smoke_runs_few_cheap_rows_on_few_tokens(tmp_path, tiny_model):
    """Five cells (the baseline and one row per quantization family, none of
    which trains or calibrates for minutes), each under 10k tokens of work:
    under 3 minutes from an empty cache and about 1 cached on the 2-core CI
    machine, measured with the README's command. Adding a row or tokens to
    smoke must be a decision: this fails."""
    from qbench.api import create_run

    suite = load_suite(str(suite_path("smoke")))
    plan, _ = create_run(model=str(tiny_model), suite="smoke", device="cpu", output_dir=str(tmp_path))
    cells = [c.cell for c in plan.cells]
    assert cells == ["fp:fp32", "torchao:int8-wo", "bnb:nf4", "gguf:q4_k_m", "onnx:int4"]
    assert not plan.skipped  # the suite names its rows: nothing to list as left out
    slow = {"awq", "gptq", "qat", "hqq", "quanto"}  # minutes to build or to decode on a CPU
    assert not slow & {c.backend for c in plan.cells}
    work = smoke_work(suite)
    assert sum(work.values()) <= 10_000, work
    assert suite.latency.trials == 1


def test_a_suites_rows_are_the_default_and_bad_ones_fail_the_plan(tmp_path, tiny_model):
    from qbench.api import create_run
    from qbench.core.errors import QBenchError

    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "few.yaml").write_text("name: few\nbackends: [fp:bf16, torchao:int4-tinygemm-g128]\n")
    plan, _ = create_run(model=str(tiny_model), suite=str(folder / "few.yaml"), device="cpu",
                         output_dir=str(tmp_path / "r1"))
    # a suite's row that cannot run on this device is left out, not failed
    assert [c.cell for c in plan.cells] == ["fp:fp32", "fp:bf16"]
    assert "CUDA" in plan.skipped["torchao:int4-tinygemm-g128"]
    plan, _ = create_run(model=str(tiny_model), suite=str(folder / "few.yaml"), device="cpu", backends=["all"],
                         output_dir=str(tmp_path / "r0"))
    assert len(plan.cells) > 10  # -b all: every variant that runs here by default
    plan, _ = create_run(model=str(tiny_model), suite=str(folder / "few.yaml"), device="cpu", backends=["fp:fp16"],
                         output_dir=str(tmp_path / "r2"))
    assert [c.cell for c in plan.cells] == ["fp:fp32", "fp:fp16"]  # -b wins
    for row in ("gguf:prequantized:path=/etc/passwd", "torchao:recipe=../r.yaml", "awq:prequantized,path=org/m"):
        (folder / "files.yaml").write_text(f"name: files\nbackends: ['{row}']\n")
        with pytest.raises(QBenchError, match="names a file .*give that row with -b"):
            create_run(model=str(tiny_model), suite=str(folder / "files.yaml"), device="cpu",
                       output_dir=str(tmp_path / "r4"))
    (folder / "bad.yaml").write_text("name: bad\nbackends: [nosuch:row]\n")
    with pytest.raises(QBenchError, match="bad.yaml: its backends list: .*nosuch"):
        create_run(model=str(tiny_model), suite=str(folder / "bad.yaml"), device="cpu", output_dir=str(tmp_path / "r3"))


def test_variants_left_out_are_one_line_counted_by_why():
    from qbench.execute.runner import skipped_summary

    line = skipped_summary({
        "torchao:int4-tinygemm-g128": "needs CUDA (a CUDA-only kernel); run with --device cuda on a GPU machine",
        "onnx:fp16": "needs CUDA: ...",
        "hqq:w8g64": "hqq dequantizes every layer on every call; ask for it by name (-b hqq:w8g64) to run it",
        "awq:w4g64": "missing gptqmodel: pip install 'qbench[gptq]'",
    })
    assert line == ("4 variant(s) not run: 2 need CUDA, 1 run by name, 1 need a package (`qbench backends` says why "
                    "for each; name one with -b to run it)")
    assert skipped_summary({}) is None


def test_a_gpu_suites_compiled_rows_are_left_out_of_a_cpu_run_not_failed():
    """gpu-quick's rows decode through the compiled runtime (CUDA graphs): on
    a CPU they are skipped with the reason, while one named with -b still
    fails with it (the planner and the worker ask the same question)."""
    from qbench.execute.runner import default_baseline, plan_cells
    from qbench.sdk.registry import PluginSettings, load_plugins

    suite = load_suite(str(suite_path("gpu-quick")))
    loaded = load_plugins(PluginSettings.from_env(()))
    cells, skipped = plan_cells(loaded, suite.backends, default_baseline("cpu"), "cpu", from_suite=True)
    assert [c.cell for c in cells] == ["fp:fp32"]
    assert all("needs CUDA" in why for why in skipped.values()) and len(skipped) == 4
    named, _ = plan_cells(loaded, ["fp:bf16:runtime=compiled"], "fp:fp32", "cpu")
    assert [c.cell for c in named] == ["fp:fp32", "fp:bf16:runtime=compiled"]
