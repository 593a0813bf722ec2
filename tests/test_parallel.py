"""Cells in parallel over GPUs (``--gpus``): the scheduler with fake GPUs
(one item at a time per GPU, every GPU busy at once, records written by the
main thread only), a real run on the CPU with two fake GPUs whose quality
figures equal a serial run's, and the option's bad input."""

import threading
import time

import pytest

from qbench.core.errors import QBenchError
from qbench.core.parallel import run_on_gpus


class Recorder:
    """A reporter that notes the thread of every call."""

    def __init__(self):
        self.threads = set()
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.threads.add(threading.current_thread().name)
            self.calls.append((name, args))
        return call


def test_each_gpu_runs_one_item_at_a_time_and_all_gpus_work_at_once():
    spans, finished = [], []

    def work(item, gpu, reporter):
        reporter.phase(item, "working")
        start = time.monotonic()
        time.sleep(0.05)
        spans.append((gpu, start, time.monotonic(), item))
        return item * 10

    def finish(item, result):
        finished.append((item, result, threading.current_thread() is threading.main_thread()))

    reporter = Recorder()
    run_on_gpus(list(range(8)), ["0", "1", "2"], work, finish, reporter)
    assert sorted(finished) == [(i, i * 10, True) for i in range(8)]  # every item, finished in the main thread
    assert reporter.threads == {threading.main_thread().name} and len(reporter.calls) == 8
    for gpu in "012":
        mine = sorted((s, e) for g, s, e, _ in spans if g == gpu)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(mine, mine[1:])), gpu  # one at a time
    assert {g for g, *_ in spans} == {"0", "1", "2"}
    first_three = sorted(spans, key=lambda s: s[1])[:3]
    assert max(s for _, s, _, _ in first_three) < min(e for _, _, e, _ in first_three)  # they overlapped


def test_pinned_items_run_on_their_gpu():
    ran = {}
    run_on_gpus(["a", "b", "c", "d"], ["0", "1"], lambda item, gpu, _: ran.setdefault(item, gpu),
                lambda item, result: None, Recorder(), assign=lambda item: "1" if item in "abc" else None)
    assert ran["a"] == ran["b"] == ran["c"] == "1"


def test_a_harness_error_stops_new_items_and_is_raised_after_the_others_finish():
    started, finished = [], []

    def work(item, gpu, _):
        started.append(item)
        if item == 0:
            raise RuntimeError("a harness bug")
        time.sleep(0.05)
        return item

    with pytest.raises(RuntimeError, match="a harness bug"):
        run_on_gpus(list(range(10)), ["0", "1"], work, lambda item, result: finished.append(item), Recorder())
    assert len(started) < 10  # nothing new started after the failure
    assert set(finished) == set(started) - {0}  # what was running finished and was kept


def test_an_interrupt_stops_the_workers_still_measuring():
    """Ctrl-C (here: ``finish`` raising) while a lane waits on a worker
    process: the worker is stopped at once, not left to finish its cell."""
    import multiprocessing

    started = []

    def work(item, gpu, _):
        started.append(item)
        if item == 0:
            return item
        child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
        child.start()
        child.join()
        return item

    def finish(item, result):
        time.sleep(1)  # the other lane's worker is running by now
        raise KeyboardInterrupt

    begun = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_on_gpus(list(range(6)), ["0", "1"], work, finish, Recorder())
    time.sleep(0.5)
    assert not multiprocessing.active_children()
    assert time.monotonic() - begun < 30 and len(started) <= 3


def test_gpus_option_names_the_problem(monkeypatch):
    import torch

    from qbench.execute.runs import resolve_gpus

    assert resolve_gpus(None, "cpu") == []
    with pytest.raises(QBenchError, match="--gpus runs cells on GPUs, but the run's device is cpu"):
        resolve_gpus("all", "cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_gpus("all", "cuda") == ["0", "1", "2", "3"]
    assert resolve_gpus("2,0", "cuda") == ["2", "0"]
    for spec, message in (("0,0", "one twice"), ("5", "names GPU 5, but this machine shows 4"),
                          ("x", "'all' or GPU indices")):
        with pytest.raises(QBenchError, match=message):
            resolve_gpus(spec, "cuda")
    # indices count the GPUs this process sees; workers get the names behind them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert resolve_gpus("1,2", "cuda") == ["5", "6"]


QUALITY = ("perplexity", "kld", "same_top_p", "acc", "gen_exact_match", "weight_bytes")


@pytest.mark.slow  # minutes of workers: `make test-slow` (the scale-out equivalence)
def test_a_run_on_two_fake_gpus_matches_a_serial_run(tiny_model, tiny_suite, tmp_path):
    """Real workers on the CPU, each told it has GPU 0 or 1: the cells after
    the baseline run at the same time, every record says which GPU it had,
    and the quality figures equal those of the same run made serially."""
    from qbench.api import create_run
    from qbench.execute.results import ResultStore
    from qbench.execute.runner import execute, save_plan

    cells = ["fp:bf16", "torchao:int8-wo", "torchao:int4-wo-g32"]
    runs = {}
    for name, gpus in (("serial", []), ("parallel", ["0", "1"])):
        plan, run_dir = create_run(model=str(tiny_model), suite=str(tiny_suite), backends=cells, device="cpu",
                                   output_dir=str(tmp_path), run_id=name)
        plan = plan.model_copy(update={"gpus": gpus})
        save_plan(plan, run_dir)
        execute(plan, run_dir)
        runs[name] = ResultStore(run_dir).latest()
    serial, parallel = runs["serial"], runs["parallel"]
    assert set(parallel) == set(serial) == {"fp:fp32", *cells}
    for cell, record in parallel.items():
        assert record.ok, record.error
        for metric in QUALITY:
            assert record.value(metric) == serial[cell].value(metric), (cell, metric)
    assert parallel["fp:fp32"].env["cuda_visible_devices"] == "0"
    assert {parallel[c].env["cuda_visible_devices"] for c in cells} == {"0", "1"}
    assert "cuda_visible_devices" not in serial["fp:bf16"].env
    spans = sorted((parallel[c].started, parallel[c].finished) for c in cells)
    assert spans[1][0] < spans[0][1]  # two cells were measured at the same time
    assert parallel["fp:fp32"].finished <= min(start for start, _ in spans)  # the baseline alone, first


def test_a_worker_dying_on_one_gpu_loses_nothing_elsewhere(tiny_model, tiny_suite, tmp_path):
    """One cell's worker exits mid-cell on one fake GPU while the other GPU
    measures: its failure is recorded with the reason, every other record
    is kept, and the run can be resumed to retry it."""
    from qbench.api import create_run
    from qbench.execute.results import ResultStore
    from qbench.execute.runner import execute, pending_cells, save_plan
    from tests.conftest import FAKE_PLUGINS

    plan, run_dir = create_run(model=str(tiny_model), suite=str(tiny_suite), backends=["fake:exit", "fake:ok",
                               "fake:slow"], device="cpu", output_dir=str(tmp_path), run_id="dies",
                               plugin_dirs=(str(FAKE_PLUGINS),))
    plan = plan.model_copy(update={"gpus": ["0", "1"]})
    save_plan(plan, run_dir)
    execute(plan, run_dir)
    latest = ResultStore(run_dir).latest()
    assert {c: r.status for c, r in latest.items()} == {"fp:fp32": "ok", "fake:exit": "failed", "fake:ok": "ok",
                                                          "fake:slow": "ok"}
    assert "exited with code" in latest["fake:exit"].error
    assert [c.cell for c in pending_cells(plan, ResultStore(run_dir), retry_failed=True)] == ["fake:exit"]


def test_gpus_per_cell_groups_the_gpus_and_names_the_problem(monkeypatch):
    import torch

    from qbench.execute.runs import resolve_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_gpus("all", "cuda", per_cell=2) == ["0,1", "2,3"]  # two lanes of two GPUs
    assert resolve_gpus(None, "cuda", per_cell=2) == ["0,1"]  # one cell at a time on the first two
    assert resolve_gpus("3,1", "cuda", per_cell=2) == ["3,1"]
    with pytest.raises(QBenchError, match="do not split into groups of 2"):
        resolve_gpus("0,1,2", "cuda", per_cell=2)
    with pytest.raises(QBenchError, match="--gpus-per-cell 8 needs 8 GPUs, but the run has 4"):
        resolve_gpus("all", "cuda", per_cell=8)
    with pytest.raises(QBenchError, match="--gpus-per-cell runs cells on GPUs, but the run's device is cpu"):
        resolve_gpus(None, "cpu", per_cell=2)


def test_gpus_per_cell_refuses_backends_that_cannot_spread_a_model():
    from qbench.execute.runner import CellSpec
    from qbench.execute.runs import check_spread
    from qbench.sdk.registry import PluginSettings, load_plugins

    builtin = load_plugins(PluginSettings(allow=("builtin",)))

    def cells(*names):
        return [CellSpec(cell=f"{n}:x", backend=n, variant="x") for n in names]

    check_spread(builtin, cells("fp", "bnb", "torchao"), 1)  # one GPU per cell: anything goes
    check_spread(builtin, cells("fp", "bnb"), 2)
    with pytest.raises(QBenchError, match="backend torchao cannot spread a model over GPUs .those that can: bnb, fp"):
        check_spread(builtin, cells("fp", "torchao"), 2)
