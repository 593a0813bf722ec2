"""``--executor ray`` on a local Ray cluster on the CPU with logical GPUs:
four cells at once whose records match a serial run's, a Ray worker lost
mid-cell (a failed record naming it, then one retry), a run resumed across
executors, and files shipped through the object store instead of read from
the driver's disk."""

import shutil

import pytest

ray = pytest.importorskip("ray")

from qbench.api import create_run  # noqa: E402
from qbench.execute.results import ResultStore  # noqa: E402
from qbench.execute.runner import LocalExecutor, execute  # noqa: E402

QUALITY = ("perplexity", "kld", "same_top_p", "acc", "gen_exact_match", "weight_bytes")


@pytest.fixture
def ray_executor():
    """An executor that starts a Ray cluster of this machine with four
    logical GPUs, each cell asking for one GPU and one CPU; stopped after
    the test (workers inherit the environment the test set up)."""
    from qbench.execute.ray_executor import RayExecutor

    made = []

    def make(**options):
        executor = RayExecutor(local_resources={"num_cpus": 4, "num_gpus": 4}, task_gpus=1, task_cpus=1, **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow  # minutes of workers: `make test-slow` (the scale-out equivalence)
def test_four_cells_run_at_once_on_ray_and_match_a_serial_run(tiny_model, tiny_suite, tmp_path, ray_executor,
                                                               monkeypatch):
    from tests.conftest import FAKE_PLUGINS

    monkeypatch.setenv("QBENCH_FAKE_SLOW_SECONDS", "6")
    suite = tmp_path / "suite"
    shutil.copytree(tiny_suite.parent, suite)
    text = (suite / "tiny.yaml").read_text().replace("min_seconds: 0}", "min_seconds: 0, trials: 2}")
    (suite / "tiny.yaml").write_text(text)
    cells = ["fp:bf16", "torchao:int8-wo", "torchao:int4-wo-g32", "fake:slow"]
    runs = {}
    shared_cache = tmp_path / "shared-cache"
    for name, executor in (("serial", LocalExecutor()), ("ray", ray_executor(cache_dir=str(shared_cache)))):
        plan, run_dir = create_run(model=str(tiny_model), suite=str(suite / "tiny.yaml"), backends=cells,
                                   device="cpu", output_dir=str(tmp_path), run_id=name, threads=1,
                                   plugin_dirs=(str(FAKE_PLUGINS),))
        execute(plan, run_dir, executor=executor)
        runs[name] = ResultStore(run_dir).latest()
    serial, on_ray = runs["serial"], runs["ray"]
    assert set(on_ray) == set(serial) == {"fp:fp32", *cells}
    for cell, record in on_ray.items():
        assert record.ok, record.error
        assert record.env["ray_node_id"] and record.env["hostname"]
        for metric in QUALITY:
            assert record.value(metric) == serial[cell].value(metric), (cell, metric)
        assert len(record.latency_trials) == 2  # trial 2 ran as a Ray task too, on the cell's node
    assert on_ray["fp:bf16"].value("kld") > 0  # the reference reached the other cells
    spans = [(on_ray[c].started, on_ray[c].finished) for c in cells]
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # all four measured at once
    assert on_ray["fp:fp32"].finished <= min(start for start, _ in spans)  # the baseline first, alone
    assert "ray_node_id" not in serial["fp:bf16"].env
    # --ray-cache: the Ray run built its artifacts in the shared folder, not in the serial run's cache
    assert on_ray["torchao:int8-wo"].artifact.path.startswith(str(shared_cache))
    assert not on_ray["torchao:int8-wo"].artifact.cache_hit


def test_a_lost_ray_worker_fails_its_record_and_is_retried_once_and_runs_resume_across_executors(
        tiny_model, tiny_suite, tmp_path, ray_executor, monkeypatch):
    """A run made on this machine, resumed on Ray: the cell that failed
    locally runs again there, loses its Ray worker once (a failed record
    naming the loss), and its retry's record is the cell's result. The
    cells measured locally keep their records."""
    from tests.conftest import FAKE_PLUGINS

    monkeypatch.setenv("QBENCH_FAKE_MARKER_DIR", str(tmp_path))
    plan, run_dir = create_run(model=str(tiny_model), suite=str(tiny_suite), backends=["fake:ok", "fake:lose-node"],
                               device="cpu", output_dir=str(tmp_path), run_id="lost", threads=1,
                               plugin_dirs=(str(FAKE_PLUGINS),))
    execute(plan, run_dir)  # locally the fake cannot find a Ray worker to lose: it fails
    store = ResultStore(run_dir)
    assert store.latest()["fake:lose-node"].status == "failed"
    execute(plan, run_dir, retry_failed=True, executor=ray_executor())
    history = [r for r in store.records() if r.cell == "fake:lose-node"]
    lost = history[-2]
    assert lost.status == "failed" and "the Ray task running it was lost on node" in lost.error, lost.error
    assert "retried once" in lost.error and lost.phase in ("quantize", "load")  # the last phase it heard of
    final = store.latest()
    assert final["fake:lose-node"].ok and final["fake:lose-node"].env["ray_node_id"]
    assert final["fake:ok"].ok and "ray_node_id" not in final["fake:ok"].env  # kept from the local run
    assert final["fake:ok"].value("kld") is not None


@pytest.mark.slow  # minutes of workers: `make test-slow` (the scale-out equivalence)
def test_ship_mode_runs_without_the_driver_files(tiny_model, tiny_suite, tmp_path, ray_executor):
    """With ``ship`` the model travels through the object store: the run
    works after the model folder is gone from the driver's disk, the
    baseline's reference comes back to the driver's run folder and reaches
    the other cells, and every cell's log lands in the driver's logs."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    plan, run_dir = create_run(model=str(model), suite=str(tiny_suite), backends=["fp:bf16"], device="cpu",
                               output_dir=str(tmp_path), run_id="shipped", threads=1)
    executor = ray_executor(files="ship")
    executor._start(plan)  # packs the model now
    shutil.rmtree(model)
    execute(plan, run_dir, executor=executor)
    latest = ResultStore(run_dir).latest()
    assert latest["fp:bf16"].ok, latest["fp:bf16"].error
    assert latest["fp:bf16"].value("kld") > 0
    assert (run_dir / "reference" / "meta.json").is_file() and (run_dir / "bandwidth.json").is_file()
    assert "phase: perplexity" in (run_dir / "logs" / "fp__bf16.log").read_text()
    # a cell no node can hold is refused at once, not left waiting for resources forever
    from qbench.core.errors import QBenchError
    from qbench.execute.ray_executor import RayExecutor

    with pytest.raises(QBenchError, match=r"no node of the Ray cluster has what one cell asks for \(1 CPU, 8 GPU\)"):
        RayExecutor(task_gpus=8, task_cpus=1)._start(plan)


def test_executor_options_are_refused_in_one_line_before_any_run_folder(tiny_model, tiny_suite, tmp_path):
    from tests.test_cli import one_line_error, qbench

    base = ["run", "--model", str(tiny_model), "--suite", str(tiny_suite), "-b", "fp:bf16", "-o", str(tmp_path)]
    for extra, message in ((["--address", "127.0.0.1:1"], "--address only apply with --executor ray"),
                           (["--executor", "ray", "--gpus", "all"], "with --executor ray, Ray places each cell"),
                           (["--executor", "ray", "--address", "127.0.0.1:1"],
                            "cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused)")):
        code, _, err = qbench(*base, *extra)
        assert code == 2 and message in one_line_error(err), err
    assert not list(tmp_path.iterdir())


def test_shipped_files_keep_their_names_below_the_node_root(tmp_path):
    from pathlib import Path

    from qbench.execute.shipping import pack, under

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"w")
    files = pack([tmp_path / "suite" / ".." / "model"])  # ".." folded by name, as the suite resolves it
    assert list(files) == [str(tmp_path / "model" / "w.bin")]
    assert under(Path("/root-of-node"), "/a/b/../c") == Path("/root-of-node/a/c")
