"""Long context: windows and prompts of several lengths in one run, each
length's quality against the baseline's on the same windows, the KV cache's
memory at each length, and the answers that depend on the context."""

import json
import textwrap

import pytest

from qbench.core.errors import QBenchError
from qbench.core.records import Metric
from qbench.data.suites import PerplexitySpec, load_suite
from tests.conftest import make_record
from tests.test_cli import qbench

SHORT, LONG = 64, 320  # LONG is past the 128 positions transformers' quantized caches keep in full precision


@pytest.fixture(scope="module")
def long_suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    path = folder / "long.yaml"
    path.write_text(textwrap.dedent(f"""
        name: long-tiny
        bos: none
        perplexity:
          corpus: {{source: "builtin:stdlib-sources"}}
          max_tokens: 640
          max_length: [{SHORT}, {LONG}]
          batch_size: 5
        fidelity: {{top_k: 64}}
        latency: {{prompt_tokens: [8, {LONG}], new_tokens: 3, warmup: 0, min_reps: 1, min_seconds: 0}}
    """))
    return path


@pytest.fixture(scope="module")
def long_run(wide_tiny_model, long_suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code, _, err = qbench("run", "--model", str(wide_tiny_model), "--suite", str(long_suite), "-b", "fp:bf16",
                          "-b", "fp:fp32:kv_cache=hqq-int4", "-o", str(out), "--run-id", "r",
                          env={"QBENCH_CACHE": str(tmp_path_factory.mktemp("cache"))})
    assert code == 0, err
    records = {r["cell"]: r for r in map(json.loads, (out / "r" / "results.jsonl").read_text().splitlines())}
    return out / "r", records


def test_each_length_is_measured_against_the_baseline_on_the_same_windows(long_run):
    _, records = long_run
    base, bf16, cache = records["fp:fp32"], records["fp:bf16"], records["fp:fp32:kv_cache=hqq-int4"]
    for record in (base, bf16, cache):
        assert sorted(map(int, record["context_sweep"])) == [8, SHORT, LONG]
    sweep = {int(k): v for k, v in cache["context_sweep"].items()}
    # A 64-token window fits in the cache's full-precision residual: nothing quantized, the baseline's
    # logits exactly. At 320 tokens the 4-bit cache holds most positions and quality moves.
    assert sweep[SHORT]["kld"]["value"] < 1e-7
    assert sweep[LONG]["kld"]["value"] > 1e-4 and sweep[LONG]["ln_ppl_ratio"]["value"] != 0
    # bf16 weights diverge at every length; the first length is the row's own figure
    bf16_sweep = {int(k): v for k, v in bf16["context_sweep"].items()}
    assert bf16_sweep[SHORT]["kld"]["value"] > 0 and bf16_sweep[LONG]["kld"]["value"] > 0
    assert bf16_sweep[SHORT]["kld"]["value"] == bf16["metrics"]["kld"]["value"]
    assert bf16_sweep[SHORT]["perplexity"]["value"] == bf16["metrics"]["perplexity"]["value"]
    # memory at each length: the cache's bytes per token x the length, plus the weights
    per_token, weights = cache["metrics"]["kv_bytes_per_token"]["value"], cache["metrics"]["weight_bytes"]["value"]
    for length in (SHORT, LONG):
        assert sweep[length]["kv_bytes"]["value"] == per_token * length
        assert sweep[length]["total_bytes"]["value"] == weights + per_token * length
    assert per_token < base["metrics"]["kv_bytes_per_token"]["value"] / 4  # 4-bit against float32
    # decode speed after each prompt length, the first being the row's own latency (the
    # headline is the geometric mean over trials, one here: equal up to exp(log(x)) rounding)
    assert sweep[8]["decode_ms_per_token"]["value"] == pytest.approx(
        cache["metrics"]["decode_ms_per_token"]["value"], rel=1e-12)
    assert sweep[LONG]["prefill_ms"]["value"] > 0 and "kld" not in sweep[8]
    # the baseline left a reference for each length
    run_dir, _ = long_run
    assert (run_dir / "reference" / f"meta-ctx{LONG}.json").is_file()


def test_the_report_draws_quality_against_context_and_answers_for_the_longest(long_run):
    run_dir, _ = long_run
    md = (run_dir / "report.md").read_text()
    assert "By context length" in md and "| fp:fp32:kv_cache=hqq-int4 | 320 |" in md
    assert "kld_vs_context.png" in md and "memory_at_context_vs_quality.png" in md
    assert (run_dir / "report_files" / "kld_vs_context.png").read_bytes().startswith(b"\x89PNG")
    assert f"Smallest total memory at {LONG} tokens of context" in md
    # export: one row per cell x context length x metric
    code, _, err = qbench("export", str(run_dir), "--csv", str(run_dir / "tidy.csv"))
    assert code == 0, err
    import pandas as pd

    tidy = pd.read_csv(run_dir / "tidy.csv")
    kld = tidy[(tidy.cell == "fp:fp32:kv_cache=hqq-int4") & (tidy.metric == "kld") & (tidy.context == LONG)]
    assert len(kld) == 1 and kld.value.iloc[0] > 1e-4


def test_the_smallest_total_memory_at_a_context_is_judged_on_its_kld_there():
    from qbench.analyze.decisions import context_answer

    def row(cell, weights, kv_per_token, kld_long, baseline=False):
        sweep = {LONG: {"total_bytes": Metric(value=weights + kv_per_token * LONG, unit="bytes"),
                        "kv_bytes": Metric(value=kv_per_token * LONG, unit="bytes"),
                        "perplexity": Metric(value=10.0, unit="ppl")}}
        if not baseline:
            sweep[LONG]["kld"] = Metric(value=kld_long, unit="nats", stderr=0.001)
        return make_record(cell=cell, baseline=baseline, context_sweep=sweep,
                           metrics={"weight_bytes": {"value": weights, "unit": "bytes"}})

    rows = [row("base", 4000, 40, None, baseline=True),
            row("small-weights", 1000, 40, 0.005),  # 1000 + 12800 = 13800
            row("small-cache", 2000, 10, 0.008),  # 2000 + 3200 = 5200: smallest, within 0.01 at its error bar
            row("tiny-but-bad", 500, 5, 0.5)]
    line = context_answer(rows, 0.01)[0]
    assert f"at {LONG} tokens" in line and "`small-cache`" in line
    assert context_answer(rows, 0.001) == [f"At {LONG} tokens of context no variant stays within the quality "
                                           f"budget (mean KLD at {LONG} tokens ≤ 0.001 at its 95% upper bound)."]


def test_lengths_are_checked_when_the_suite_is_read(tmp_path, tiny_model):
    corpus = {"source": "builtin:pydoc-topics"}
    assert PerplexitySpec(corpus=corpus, max_length=[512, 2048]).batch_at(2048) == 1  # 2 x 512 tokens a pass
    assert PerplexitySpec(corpus=corpus, max_length=[256, 1024], batch_size=8).batch_at(1024) == 2
    with pytest.raises(ValueError, match="lists a length twice"):
        PerplexitySpec(corpus=corpus, max_length=[512, 512])
    with pytest.raises(ValueError, match="stride applies to one max_length"):
        PerplexitySpec(corpus=corpus, max_length=[256, 512], stride=128)
    # a length past the model's positions fails the plan with the length named
    (tmp_path / "s.yaml").write_text("name: s\nperplexity: {corpus: {source: 'builtin:pydoc-topics'}, "
                                     "max_tokens: 2000, max_length: [64, 1024]}\n")
    from qbench.api import create_run

    with pytest.raises(QBenchError, match="perplexity.max_length 1024 needs 1,023 positions but the model has 512"):
        create_run(model=str(tiny_model), suite=str(tmp_path / "s.yaml"), device="cpu", output_dir=str(tmp_path))
    assert load_suite(str(tmp_path / "s.yaml")).perplexity.lengths == [64, 1024]


def test_the_stdlib_corpus_is_long_documents_that_need_no_download():
    from qbench.data.corpus import STDLIB_MODULES, _builtin_documents

    docs = _builtin_documents("builtin:stdlib-sources")
    assert len(docs) == len(STDLIB_MODULES) and min(map(len, docs)) > 25_000
    assert docs[0].startswith(('"""', "# Author", "#")) and "class ArgumentParser" in docs[0]


def test_a_memory_budget_counts_the_kv_cache_at_its_context():
    from qbench.analyze.search import Budget, verdict_of

    budget = Budget.parse("memory@8192<=600MiB")
    assert (budget.metric, budget.context, budget.bound, budget.is_size) == ("memory", 8192, 600 * 2**20, True)
    weights = 257 * 2**20

    def rec(cell, per_token):
        return make_record(cell=cell, backend="fp", variant=cell.split(":", 1)[1], metrics={
            "weight_bytes": {"value": weights, "unit": "bytes"}, "kv_bytes_per_token": {"value": per_token,
                                                                                         "unit": "bytes"}})

    full = verdict_of(budget, rec("fp:bf16", 46080), None, "uniform")  # 257 MiB + 360 MiB
    assert full.memory_bytes == weights + 46080 * 8192 and not full.meets
    int4 = verdict_of(budget, rec("fp:bf16:kv_cache=hqq-int4", 12240), None, "uniform")  # + 95.6 MiB
    assert int4.memory_bytes == weights + 12240 * 8192 and int4.meets
    no_kv = verdict_of(budget, make_record(cell="x:y", metrics={"weight_bytes": {"value": 1, "unit": "bytes"}}),
                       None, "uniform")
    assert not no_kv.meets and "KV cache bytes per token" in no_kv.error
    with pytest.raises(QBenchError, match="memory@8192<=600MiB"):
        Budget.parse("memory@8192>=600MiB")


def test_the_shipped_long_suite_plans_its_rows_on_a_cpu():
    from qbench.data.suites import suite_path
    from qbench.execute.runner import plan_cells
    from qbench.sdk.registry import PluginSettings, load_plugins

    suite = load_suite(str(suite_path("long")))
    assert suite.perplexity.lengths == [512, 2048, 8192] and suite.latency.prompt_lengths == [256, 2048]
    loaded = load_plugins(PluginSettings.from_env(()))
    cells, skipped = plan_cells(loaded, suite.backends, "fp:fp32", "cpu", from_suite=True)
    assert [c.cell for c in cells] == ["fp:fp32", "fp:bf16", "fp:bf16:kv_cache=fp8", "fp:bf16:kv_cache=quanto-int4",
                                       "gguf:q8_0"]
    assert not skipped
