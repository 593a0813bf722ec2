"""qbench search: the budget grammar, the error-bar rule, which answer wins,
and a whole search on the tiny model, interrupted and finished."""

import json

import pytest

from qbench.analyze.search import Budget, Verdict, best_of, verdict_of
from qbench.core.errors import QBenchError
from qbench.core.records import Metric
from tests.conftest import make_record


@pytest.mark.parametrize("text,metric,bound,relative", [
    ("kld<=0.05", "kld", 0.05, False),
    (" KLD <= 2e-2 ", "kld", 0.02, False),
    ("acc>=0.99*base", "acc", 0.99, True),
    ("acc>=0.7", "acc", 0.7, False),
    ("weights<=150MiB", "weights", 150 * 2**20, False),
    ("weights <= 1.5 GiB", "weights", 1.5 * 2**30, False),
    ("weights<=200MB", "weights", 200e6, False),
])
def test_budgets_parse(text, metric, bound, relative):
    budget = Budget.parse(text)
    assert (budget.metric, budget.relative) == (metric, relative)
    assert budget.bound == pytest.approx(bound)


@pytest.mark.parametrize("text", ["kld<0.05", "kld>=0.05", "acc<=0.9", "acc>=1.5", "weights<=big", "ppl<=10",
                                  "kld<=-1", "kld<=nan", "kld<=inf", "acc>=nan*base", "weights<=1.2.3MiB",
                                  "weights<=."])
def test_bad_budgets_say_how_to_write_one(text):
    with pytest.raises(QBenchError, match="budget"):
        Budget.parse(text)


def _record(cell: str, kld=None, acc=None, weights=100 * 2**20, n=None, **extra):
    metrics = {"weight_bytes": Metric(value=weights, unit="bytes")}
    if kld is not None:
        metrics["kld"] = Metric(value=kld[0], unit="nats", stderr=kld[1])
    if acc is not None:
        metrics["acc"] = Metric(value=acc[0], unit="fraction", stderr=acc[1], n=n)
    backend, _, variant = cell.partition(":")
    return make_record(cell=cell, backend=backend, variant=variant, metrics=metrics, **extra)


def test_a_budget_is_met_only_at_the_error_bar():
    budget = Budget.parse("kld<=0.05")
    # The point estimate is inside, the upper end of its 95% interval is not: 0.04 + 1.96 * 0.01 = 0.0596.
    close = verdict_of(budget, _record("t:a", kld=(0.04, 0.01)), None, "uniform")
    assert not close.meets and close.at_error_bar == pytest.approx(0.0596)
    assert verdict_of(budget, _record("t:b", kld=(0.04, 0.004)), None, "uniform").meets  # 0.04784
    # Accuracy relative to the baseline: the lower end must reach 0.99 x 0.80 = 0.792.
    acc = Budget.parse("acc>=0.99*base")
    base = _record("fp:fp32", acc=(0.80, 0.01))
    assert not verdict_of(acc, _record("t:c", acc=(0.80, 0.01)), base, "uniform").meets  # 0.7804
    verdict = verdict_of(acc, _record("t:d", acc=(0.80, 0.002)), base, "uniform")  # 0.79608
    assert verdict.meets and verdict.target == pytest.approx(0.792)
    # A failed cell never meets a budget, whatever it measured before failing.
    failed = _record("t:e", kld=(0.0, 0.0), status="failed", error="out of memory")
    assert not verdict_of(budget, failed, None, "uniform").meets


def test_the_answer_is_the_smallest_that_meets_a_quality_budget_or_the_best_within_a_size():
    def v(cell, weights, kld, meets):
        return Verdict(cell=cell, kind="uniform", weight_bytes=weights, kld=kld, target=0, meets=meets)

    tried = [v("a", 300, 0.001, True), v("b", 200, 0.04, True), v("c", 100, 0.3, False)]
    assert best_of(Budget.parse("kld<=0.05"), tried).cell == "b"
    fits = [v("a", 300, 0.001, False), v("b", 200, 0.04, True), v("c", 100, 0.3, True)]
    assert best_of(Budget.parse("weights<=250MiB"), fits).cell == "b"  # of b and c (which fit), b is better
    assert best_of(Budget.parse("kld<=0.05"), tried[2:]) is None


@pytest.fixture(scope="module")
def search_suite(tiny_suite, tmp_path_factory):
    """The tiny suite with a calibration set read from a file beside it: the
    search's own suite, in its own folder, must still find that file."""
    folder = tmp_path_factory.mktemp("search-suite")
    (folder / "code.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(60)))
    (folder / "mc.jsonl").write_text((tiny_suite.parent / "mc.jsonl").read_text())
    path = folder / "tiny.yaml"
    path.write_text(tiny_suite.read_text() + "calibration_sets:\n  code: {corpus: {source: code.txt}, samples: 2, "
                    "seq_len: 32}\n")
    return path


@pytest.fixture(scope="module")
def uniform_klds(tiny_model, search_suite, tmp_path_factory):
    """The two uniform variants' KLD on the tiny model, to set a budget between them."""
    import qbench
    from qbench.execute.results import ResultStore

    df = qbench.run(model=str(tiny_model), suite=str(search_suite), backends=["torchao:int8-wo", "torchao:int4-wo-g32"],
                    device="cpu", output_dir=str(tmp_path_factory.mktemp("uniform")))
    records = ResultStore(df.attrs["run_dir"]).latest()
    return {cell: (records[cell].value("kld"), records[cell].stderr("kld"))
            for cell in ("torchao:int8-wo", "torchao:int4-wo-g32")}


def test_search_builds_recipes_from_sensitivity_and_resumes_an_interrupted_search(tiny_model, search_suite, tmp_path,
                                                                                   uniform_klds):
    from qbench.api import search
    from qbench.execute.results import ResultStore
    from qbench.execute.runner import load_plan

    (int8, int8_se), (int4, int4_se) = uniform_klds["torchao:int8-wo"], uniform_klds["torchao:int4-wo-g32"]
    bound = ((int8 + 2 * int8_se) * (int4 - 2 * int4_se)) ** 0.5  # between the two, clear of both error bars
    options = dict(backends=["torchao:int8-wo", "torchao:int4-wo-g32"], model=str(tiny_model),
                   suite=str(search_suite), device="cpu", unit="type", tokens=200, output_dir=str(tmp_path),
                   run_id="s")
    # On this model torchao's CPU int4 (codes stored in int8, plus group scales) holds more bytes than
    # int8-wo: no recipe mixing them can be smaller than int8-wo, and the search says so.
    auto = search(f"kld<={bound:.6g}", **{**options, "run_id": "auto"})
    assert [v.kind for v in auto.path] == ["uniform", "uniform"] and auto.chosen.cell == "torchao:int8-wo"
    assert "is smaller than torchao:int8-wo" in auto.why and "--base" in auto.why

    options["base"] = "int4-wo-g32"
    result = search(f"kld<={bound:.6g}", **options)
    uniform = {v.cell: v for v in result.path if v.kind == "uniform"}
    assert uniform["torchao:int8-wo"].meets and not uniform["torchao:int4-wo-g32"].meets
    recipes = sorted((v for v in result.path if v.kind == "recipe"), key=lambda v: v.k)
    # 7 layer types, bisected: k = 3, then 1 or 5, then one more.
    assert 2 <= len(recipes) <= 3 and recipes[0].k >= 1
    # Each unit moved from int4 to int8 changes the bytes the same way: every recipe lies between the two.
    sizes = [v.weight_bytes for v in recipes]
    ends = sorted([uniform["torchao:int8-wo"].weight_bytes, uniform["torchao:int4-wo-g32"].weight_bytes])
    assert sizes in (sorted(sizes), sorted(sizes, reverse=True)) and len(set(sizes)) == len(sizes)
    assert all(ends[0] < size < ends[1] for size in sizes)
    # Bisection: the recipes that meet the budget upgrade more units than those that miss it.
    met = [v.k for v in recipes if v.meets]
    missed = [v.k for v in recipes if not v.meets]
    assert not met or not missed or min(met) > max(missed)
    chosen = result.chosen
    assert chosen is not None and chosen.meets and chosen == best_of(result.budget, result.path)
    folder = tmp_path / "s"
    assert (folder / "search.png").stat().st_size > 0
    saved = json.loads((folder / "search_result.json").read_text())
    assert saved["chosen"]["cell"] == chosen.cell and len(saved["path"]) == len(result.path)
    # Every configuration tried is a cell of a normal run folder.
    plan = load_plan(folder / "cells")
    assert {c.cell for c in plan.cells} == {v.cell for v in result.path} | {"fp:fp32"}
    assert (folder / "sensitivity" / "sensitivity.jsonl").exists()
    # The cells' report carries the search: its path, the answer, the plot and the ranking.
    report = (folder / "cells" / "report.md").read_text()
    assert f"## Search: kld<={bound:.6g}" in report and f"Chosen: `{chosen.cell}`" in report
    assert "search.png" in report and (folder / "cells" / "report_files" / "search.png").exists()
    assert "Sensitivity the recipes were built from" in report

    # Interrupted before the last recipe's record was written: the rerun measures that cell only.
    results_file = folder / "cells" / "results.jsonl"
    lines = results_file.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])["cell"]
    results_file.write_text("".join(lines[:-1]))
    again = search(f"kld<={bound:.6g}", **options)
    assert [v.cell for v in again.path] == [v.cell for v in result.path]
    assert again.chosen.cell == chosen.cell
    counts = {}
    for line in results_file.read_text().splitlines():
        counts[json.loads(line)["cell"]] = counts.get(json.loads(line)["cell"], 0) + 1
    assert counts[last] == 1 and all(n == 1 for n in counts.values())
    assert ResultStore(folder / "cells").latest()[last].ok
    # A damaged result file: the report says how to write it again, in one line.
    from qbench.present.report import write_report

    (folder / "search_result.json").write_text('{"budget":')
    with pytest.raises(QBenchError, match="rerun the search"):
        write_report(folder / "cells")
    # Another budget in the same folder would mix two searches.
    with pytest.raises(QBenchError, match="holds a search with other settings"):
        search("kld<=0.5", **options)


def test_upgrades_improve_quality_whatever_the_budget():
    """For a size budget the upgrade is a better variant than the base, never
    merely a bigger one; for a quality budget the smallest that meets it."""
    from qbench.analyze.search import pick_upgrade

    class Config:
        def mix_key(self):
            return ("float32", False)

    def v(cell, weights, kld, meets):
        return Verdict(cell=cell, kind="uniform", weight_bytes=weights, kld=kld, target=0, meets=meets)

    int8, int4, wide = v("torchao:int8", 200, 0.003, True), v("torchao:int4", 220, 0.35, False), \
        v("torchao:int8-g", 230, 0.002, True)
    configs = {x.cell: Config() for x in (int8, int4, wide)}
    # Within 210 MiB (int8 fits, int4 and int8-g do not): from int8, only int8-g is better.
    size = Budget.parse("weights<=210MiB")
    fits = [x.model_copy(update={"meets": x.weight_bytes <= 210}) for x in (int8, int4, wide)]
    assert pick_upgrade(size, fits, fits[0], configs) == "int8-g"
    assert pick_upgrade(size, fits[:2], fits[0], configs) is None  # int4 is worse: keep in full precision
    assert pick_upgrade(Budget.parse("kld<=0.05"), [int8, int4, wide], int4, configs) == "int8"


def test_a_relative_budget_needs_a_baseline_accuracy_away_from_zero():
    """acc>=0.99*base against a baseline at 0 once called int4 a pass."""
    from qbench.analyze.search import check_relative_baseline
    from qbench.core.errors import QBenchError

    budget = Budget.parse("acc>=0.99*base")
    with pytest.raises(QBenchError, match=r"baseline's accuracy is 0.0000 ± 0.0000 \(95%, 40 items\).*reaches 0"):
        check_relative_baseline(budget, _record("fp:fp32", acc=(0.0, 0.0), n=40))
    with pytest.raises(QBenchError, match=r"0.0500 ± 0.0676"):
        check_relative_baseline(budget, _record("fp:fp32", acc=(0.05, 0.0345), n=40))
    check_relative_baseline(budget, _record("fp:fp32", acc=(0.8, 0.063), n=40))  # 0.68 .. 0.92: judged
    with pytest.raises(QBenchError, match="the baseline failed: boom"):
        check_relative_baseline(budget, _record("fp:fp32", status="failed", error="boom"))
