"""Isolation, failure records, resume after SIGKILL, and the Python API."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qbench
from qbench.api import create_run
from qbench.execute.results import ResultStore, load_results
from qbench.execute.runner import execute, split_backend_specs
from tests.conftest import FAKE_PLUGINS, REPO


def test_split_backend_specs_keeps_custom_settings_together():
    assert split_backend_specs(["fp,fake:ok", "rtn:bits=4,group_size=64", "fp:bf16"]) == [
        "fp", "fake:ok", "rtn:bits=4,group_size=64", "fp:bf16"]


def test_failing_cells_are_recorded_and_the_others_finish(tiny_model, tiny_suite, tmp_path):
    plan, run_dir = create_run(
        model=str(tiny_model), suite=str(tiny_suite), device="cpu", cell_timeout=45,
        backends=["fake:raise", "fake:exit", "fake:hang", "fp:bf16"], plugin_dirs=(str(FAKE_PLUGINS),),
        output_dir=str(tmp_path))

    class Numbers:
        started: list[tuple[str, int, int]] = []

        def cell_started(self, cell, index, total):
            self.started.append((cell, index, total))

        def phase(self, cell, name): pass
        def cell_finished(self, cell, status, seconds, error): pass
        def warn(self, message): pass

    numbers = Numbers()
    execute(plan, run_dir, numbers)
    # one numbering for the run: the baseline is [1/5], not [1/1]
    assert numbers.started == [("fp:fp32", 1, 5), ("fake:raise", 2, 5), ("fake:exit", 3, 5), ("fake:hang", 4, 5),
                               ("fp:bf16", 5, 5)]
    records = {r.cell: r for r in ResultStore(run_dir).records()}
    assert list(records) == ["fp:fp32", "fake:raise", "fake:exit", "fake:hang", "fp:bf16"]
    assert records["fake:raise"].status == "failed"
    assert "RuntimeError during load: scripted failure in load" in records["fake:raise"].error
    assert records["fake:exit"].status == "failed"
    assert "exited with code 3 during load" in records["fake:exit"].error
    assert records["fake:hang"].status == "failed"
    assert "timed out after 45s during load" in records["fake:hang"].error
    for cell in ("fp:fp32", "fp:bf16"):
        assert records[cell].ok, records[cell].error
    bf16 = records["fp:bf16"].metrics
    # A real, non-trivial comparison against the baseline on the same tokens.
    assert 0 < bf16["kld"].value < 0.05
    assert bf16["kld"].n == records["fp:fp32"].metrics["perplexity"].n
    assert bf16["weight_bytes"].value * 2 == pytest.approx(records["fp:fp32"].value("weight_bytes"), rel=0.01)
    # Every record carries its environment and provenance: the artifact's own
    # cache key (once overwritten by a loop variable), the suite's files.
    env = records["fp:bf16"].env
    assert env["packages"]["torch"] and env["torch_threads"] >= 1
    assert records["fp:bf16"].suite.hash == plan.suite_hash
    assert records["fp:bf16"].suite.data_files == plan.suite_files and len(plan.suite_files) == 1
    keys = {records[c].artifact.key for c in ("fp:fp32", "fp:bf16")}
    assert len(keys) == 2 and all(len(k) == 20 and k != "acc_norm" for k in keys)
    assert set(records["fp:bf16"].tasks) == {"mc"} and records["fp:bf16"].tasks["mc"]["acc"].n == 4
    assert records["fake:raise"].log.endswith(".log")


def _run_cli(args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "qbench.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint, **kwargs)


def _default_sigint() -> None:
    """The runner starts with Ctrl-C's default disposition whatever the test
    process inherited (a job started without job control ignores SIGINT,
    and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_resume_after_sigkill_keeps_finished_records(tiny_model, tiny_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_FAKE_SLOW_SECONDS", "60")
    args = ["run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu",
            "-b", "fake:ok,fake:slow,fp:bf16", "--plugins-dir", str(FAKE_PLUGINS), "-o", str(tmp_path),
            "--run-id", "killed"]
    proc = _run_cli(args, start_new_session=True)
    results = tmp_path / "killed" / "results.jsonl"
    deadline = time.time() + 240
    # Wait until the baseline and fake:ok are written and fake:slow is sleeping in load.
    while time.time() < deadline:
        if results.is_file() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the first cells never finished: " + proc.communicate()[0][-2000:])
    before = results.read_text()
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its worker, as a crash or OOM kill would
    proc.wait()
    monkeypatch.setenv("QBENCH_FAKE_SLOW_SECONDS", "0")
    resumed = _run_cli(["run", "--resume", str(tmp_path / "killed")])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "2 cell(s) already finished; running 2" in output
    after = results.read_text()
    assert after.startswith(before)  # nothing measured was lost or rewritten
    cells = [json.loads(line)["cell"] for line in after.splitlines()]
    assert cells == ["fp:fp32", "fake:ok", "fake:slow", "fp:bf16"]


def test_python_api_runs_and_loads_results(tiny_model, tiny_suite, tmp_path):
    df = qbench.run(model=str(tiny_model), suite=str(tiny_suite), backends=["fake:uniform"], device="cpu",
                    plugin_dirs=(str(FAKE_PLUGINS),), output_dir=str(tmp_path))
    assert list(df["cell"]) == ["fp:fp32", "fake:uniform"]
    uniform = df.set_index("cell").loc["fake:uniform"]
    vocab = json.loads((Path(tiny_model) / "config.json").read_text())["vocab_size"]
    # The harness, not the backend, computes perplexity: uniform logits give exactly V.
    assert uniform["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert uniform["same_top_p"] < 0.5 and uniform["kld"] > 0.1
    again = load_results(df.attrs["run_dir"])
    assert again["perplexity"].tolist() == pytest.approx(df["perplexity"].tolist())


def test_steps_timed_on_the_device_are_taken_at_their_finishing_times(tiny_model, tiny_suite, tmp_path):
    """A session that queues its steps (the compiled runtime) reports each
    step's finishing time after the last one: the harness must take those
    times, not the moments of the late calls (microseconds apart)."""
    from qbench.metrics.cost import DEVICE_CLOCK

    df = qbench.run(model=str(tiny_model), suite=str(tiny_suite), backends=["fake:queued"], device="cpu",
                    plugin_dirs=(str(FAKE_PLUGINS),), output_dir=str(tmp_path))
    record = ResultStore(df.attrs["run_dir"]).latest()["fake:queued"]
    assert record.ok, record.error
    assert record.latency_workload["step_clock"] == DEVICE_CLOCK
    assert 19 <= record.value("decode_ms_per_token") < 60  # the fake sleeps 20 ms per step


def test_runs_that_name_no_variants_leave_out_what_is_slow_or_redundant_on_cpu():
    from qbench.execute.runner import plan_cells
    from qbench.sdk.registry import PluginSettings, load_plugins

    loaded = load_plugins(PluginSettings(allow=("builtin",)))
    cells, skipped = plan_cells(loaded, [], "fp:fp32", "cpu")
    names = [c.cell for c in cells]
    assert names[0] == "fp:fp32" and "gptq:w4g32" in names and "bnb:nf4" in names
    for cell, why in [("fp:fp16", "fp16 matmuls"), ("bnb:nf4-dq", "repacks 4-bit weights"),
                      ("gptq:w8g128", "TorchLinear"), ("gptq:prequantized", "path="),
                      ("torchao:float8-wo", "needs CUDA")]:
        assert cell not in names and why in skipped[cell], (cell, skipped.get(cell))
    # Asked for by name, they run.
    cells, _ = plan_cells(loaded, ["bnb:nf4-dq", "gptq:w8g128"], "fp:fp32", "cpu")
    assert [c.cell for c in cells] == ["fp:fp32", "bnb:nf4-dq", "gptq:w8g128"]


def test_latency_trials_run_in_fresh_workers_after_every_cell(tiny_model, tiny_suite, tmp_path, monkeypatch):
    suite = tmp_path / "trials.yaml"
    suite.write_text(tiny_suite.read_text().replace("min_seconds: 0}", "min_seconds: 0, trials: 3}"))
    for data in tiny_suite.parent.iterdir():
        if data.suffix == ".jsonl":
            (tmp_path / data.name).write_text(data.read_text())
    monkeypatch.setenv("QBENCH_FAKE_MARKER_DIR", str(tmp_path))
    plan, run_dir = create_run(model=str(tiny_model), suite=str(suite), device="cpu", backends=["fake:flaky"],
                               plugin_dirs=(str(FAKE_PLUGINS),), output_dir=str(tmp_path / "out"))
    execute(plan, run_dir)
    store = ResultStore(run_dir)
    # Each cell, then trial 2 of each cell, then trial 3: a new record each time.
    assert [r.cell for r in store.records()] == ["fp:fp32", "fake:flaky"] * 3
    latest = store.latest()
    assert list(latest) == ["fp:fp32", "fake:flaky"]
    base = latest["fp:fp32"]
    # Trials the machine canary marked busy are left out of the figures (this
    # machine may be busy running other tests), never out of the record.
    used, busy = base.latency_workload["trials"], base.latency_workload["trials_left_out_busy"]
    assert len(base.latency_trials) == 3 and used + busy == 3
    assert len(base.metrics["decode_ms_per_token"].get("trials")) == used
    assert used < 2 or base.stderr("decode_ms_per_token") > 0
    assert base.metrics["perplexity"] == store.records()[0].metrics["perplexity"]  # quality kept as measured
    assert len(base.trial_wall_seconds) == 2
    # A trial that fails leaves the cell's figures and says why; it is not retried.
    flaky = latest["fake:flaky"]
    assert flaky.ok and len(flaky.latency_trials) == 1
    assert [e.split(":")[0] for e in flaky.latency_trial_errors] == ["latency trial 2", "latency trial 3"]
    assert "scripted failure in a second load" in flaky.latency_trial_errors[0]
    assert flaky.stderr("decode_ms_per_token") is None
    assert execute(plan, run_dir) == []  # resuming finds nothing left to do
    # Each round's workers come from a fresh fork server: a cell's trials never share one.
    if "forkserver" in multiprocessing.get_all_start_methods():
        parents = [line.split()[1] for line in (tmp_path / "loads").read_text().splitlines()]
        assert len(parents) == 3 and len(set(parents)) == 3


def test_resume_after_a_torn_last_line_moves_the_fragment_aside(tiny_model, tiny_suite, tmp_path):
    args = ["run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu", "-b", "fake:ok",
            "--plugins-dir", str(FAKE_PLUGINS), "-o", str(tmp_path), "--run-id", "torn"]
    assert _run_cli(args).wait(timeout=300) == 0
    results = tmp_path / "torn" / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    fragment = lines[1][: len(lines[1]) // 2]  # a writer killed mid-line
    results.write_text(lines[0] + fragment)
    resumed = _run_cli(["run", "--resume", str(tmp_path / "torn")])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "ended in a half-written line" in output and "1 cell(s) already finished; running 1" in output
    records = [json.loads(line) for line in results.read_text().splitlines()]  # every line whole again
    assert [r["cell"] for r in records] == ["fp:fp32", "fake:ok"]
    aside = list((tmp_path / "torn").glob("results.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_text() == fragment
    again = _run_cli(["run", "--resume", str(tmp_path / "torn")])
    assert "2 cell(s) already finished; running 0" in again.communicate(timeout=300)[0]  # measured once, not again


def test_a_record_the_results_file_cannot_take_is_kept_and_added_on_resume(tiny_model, tiny_suite, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("QBENCH_FAKE_SLOW_SECONDS", "8")
    args = ["run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu", "-b", "fake:slow",
            "--plugins-dir", str(FAKE_PLUGINS), "-o", str(tmp_path), "--run-id", "full"]
    proc = _run_cli(args)
    results = tmp_path / "full" / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (results.is_file() and results.read_text().count("\n") == 1):
        time.sleep(0.2)
    saved = results.read_text()
    results.unlink()
    results.mkdir()  # appending now fails (even as root) while fake:slow is being measured
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, output
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "the record of fake:slow is kept in" in error[0] and "--resume" in error[0]
    pending = list((tmp_path / "full" / "pending").glob("*.json"))
    assert len(pending) == 1 and json.loads(pending[0].read_text())["cell"] == "fake:slow"
    results.rmdir()
    results.write_text(saved)
    resumed = _run_cli(["run", "--resume", str(tmp_path / "full")])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "added the record of fake:slow" in output and "2 cell(s) already finished; running 0" in output
    assert [r.cell for r in ResultStore(tmp_path / "full").records()] == ["fp:fp32", "fake:slow"]
    assert not list((tmp_path / "full" / "pending").glob("*.json"))


def test_one_damaged_run_does_not_stop_new_runs(tiny_model, tiny_suite, tmp_path):
    damaged = tmp_path / "old"
    damaged.mkdir()
    (damaged / "plan.json").write_text("{}")
    (damaged / "results.jsonl").write_text('{"foo": 1}\n{"bar": 2}\n')
    proc = _run_cli(["run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu", "-b",
                     "fake:ok", "--plugins-dir", str(FAKE_PLUGINS), "-o", str(tmp_path), "--run-id", "new"])
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "warning: time estimate leaves out old" in output and "Traceback" not in output


def test_store_validates_records_and_names_the_bad_line(tmp_path):
    from qbench.core.errors import QBenchError
    from tests.conftest import make_record

    store = ResultStore(tmp_path)
    store.append(make_record())
    (tmp_path / "results.jsonl").open("a").write('{"cell": "x"}\n')
    with pytest.raises(QBenchError, match=r"results.jsonl:2: not a qbench record \(field .run_id.: Field required"):
        store.records()
    with pytest.raises(Exception, match="status"):
        store.append(make_record().model_copy(update={"status": "weird"}))  # never written unchecked
    # Version-1 lines (tasks and trials inside metrics) are read as version 2.
    old = make_record().model_dump(by_alias=True)
    old.update(schema=1, metrics={"acc": {"value": 0.5, "unit": "fraction"},
                                  "tasks": {"t": {"acc": {"value": 0.5, "unit": "fraction"}}},
                                  "latency_workload": {"new_tokens": 4}, "latency_trials": [{"x": 1}]})
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    record = store.records()[0]
    assert record.schema_version == 4 and record.tasks["t"]["acc"].value == 0.5
    assert record.latency_workload == {"new_tokens": 4} and set(record.metrics) == {"acc"}


def test_ctrl_c_keeps_finished_records_and_resume_finishes(tiny_model, tiny_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_FAKE_SLOW_SECONDS", "60")
    monkeypatch.setenv("QBENCH_FAKE_MARKER_DIR", str(tmp_path))
    args = ["run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu", "-b",
            "fake:slow,fp:bf16", "--plugins-dir", str(FAKE_PLUGINS), "-o", str(tmp_path), "--run-id", "int"]
    proc = _run_cli(args, start_new_session=True)
    results, loads = tmp_path / "int" / "results.jsonl", tmp_path / "loads"
    deadline = time.time() + 240
    while time.time() < deadline and not (loads.is_file() and "slow" in loads.read_text()):
        time.sleep(0.2)
    time.sleep(1)  # fake:slow is now sleeping in load
    assert results.read_text().count("\n") == 1  # the baseline's record, nothing more
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the runner and its worker, as in a terminal
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "aborted" in output and "Traceback" not in output, output
    assert [json.loads(line)["cell"] for line in results.read_text().splitlines()] == ["fp:fp32"]
    monkeypatch.setenv("QBENCH_FAKE_SLOW_SECONDS", "0")
    resumed = _run_cli(["run", "--resume", str(tmp_path / "int")])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "1 cell(s) already finished; running 2" in output, output


def test_one_process_measures_a_run_at_a_time(tiny_model, tiny_suite, tmp_path, monkeypatch):
    """Two `--resume` of one run at once once ran every cell twice, with
    decode figures 30x slower and no note. The second is now refused in one
    line naming the holder; the first finishes alone, each cell once."""
    monkeypatch.setenv("QBENCH_FAKE_SLOW_SECONDS", "6")
    monkeypatch.setenv("QBENCH_FAKE_MARKER_DIR", str(tmp_path))
    plan, run_dir = create_run(model=str(tiny_model), suite=str(tiny_suite), backends=["fake:slow"], device="cpu",
                               plugin_dirs=(str(FAKE_PLUGINS),), output_dir=str(tmp_path), run_id="shared")
    first = _run_cli(["run", "--resume", str(run_dir)])
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "run.lock").is_file():
        time.sleep(0.1)
    second = _run_cli(["run", "--resume", str(run_dir)])
    output = second.communicate(timeout=120)[0]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1, output
    assert f"run shared is being measured by qbench pid {first.pid} on host" in errors[0], errors[0]
    assert first.communicate(timeout=300)[0] and first.returncode == 0
    assert sorted(r.cell for r in ResultStore(run_dir).records()) == ["fake:slow", "fp:fp32"]
    # The lock goes with its process: the run can be resumed (nothing left to do) right after.
    again = _run_cli(["run", "--resume", str(run_dir)])
    assert "2 cell(s) already finished; running 0" in again.communicate(timeout=300)[0] and again.returncode == 0


def test_pending_records_are_adopted_only_when_they_match_the_plan(tiny_model, tiny_suite, tmp_path, monkeypatch):
    """A pending record of another suite (a doctored perplexity in it) was
    once adopted with a warning. Now: run id, suite hash, model fingerprint
    and the plan's cell must all match; the rest is set aside with the
    reason, and another run's record is left alone."""
    import warnings

    from qbench.execute.results import save_pending
    from tests.conftest import make_record

    plan, run_dir = create_run(model=str(tiny_model), suite=str(tiny_suite), backends=["fp:bf16"], device="cpu",
                               output_dir=str(tmp_path), run_id="adopt")
    ours = {"run_id": plan.run_id, "model": plan.model.model_dump(), "device": "cpu",
            "suite": {"name": plan.suite_name, "path": plan.suite_path, "hash": plan.suite_hash}}
    good = make_record(**ours, cell="fp:bf16", variant="bf16", metrics={"perplexity": {"value": 12.0, "unit": "ppl"}})
    other_suite = good.updated(suite={**ours["suite"], "hash": "0123456789abcdef"},
                               metrics={"perplexity": {"value": 1.0, "unit": "ppl"}})
    other_model = good.updated(model={**ours["model"], "fingerprint": "feedfacefeedface"})
    not_planned = good.updated(cell="fp:fp16", variant="fp16")
    other_run = good.updated(run_id="someone-else")
    saved = [save_pending(run_dir, r) for r in (good, other_suite, other_model, not_planned, other_run)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adopted = ResultStore(run_dir).adopt_pending(plan)
    assert adopted == ["fp:bf16"]
    assert [r.value("perplexity") for r in ResultStore(run_dir).records()] == [12.0]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3, messages
    assert any("suite hash 0123456789abcdef, the run's suite is" in m for m in messages)
    assert any("model feedfacefeedface" in m for m in messages)
    assert any("its cell fp:fp16 is not in the run's plan" in m for m in messages)
    aside = sorted(p.name for p in (run_dir / "pending" / "rejected").iterdir())
    assert aside == sorted(p.name for p in saved[1:4])
    assert saved[4].is_file() and not saved[0].exists()  # another run's record stays where it was


def test_a_full_disk_in_a_later_phase_keeps_the_finished_phases(tiny_model, tiny_suite, tmp_path):
    """ENOSPC during latency once threw the cell's perplexity and accuracy
    away and ended the run with "unexpected OSError". Now the record keeps
    the finished phases' figures, names the failing phase, and says in one
    line that the disk is full and where."""
    out = tmp_path / "out"
    proc = _run_cli(["run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu", "-b",
                     "fake:disk-full", "--plugins-dir", str(FAKE_PLUGINS), "-o", str(out), "--run-id", "full"])
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "Traceback" not in output and "unexpected" not in output, output
    record = ResultStore(out / "full").latest()["fake:disk-full"]
    assert record.status == "failed" and record.phase == "latency"
    assert record.completed_phases == ["perplexity", "tasks", "generation"]
    assert record.value("perplexity") == pytest.approx(len(__import__("transformers").AutoTokenizer
                                                           .from_pretrained(tiny_model)), rel=1e-5)
    assert record.value("acc") is not None and record.value("decode_ms_per_token") is None
    assert "no space left on the disk during latency writing /full/disk/machine_canary.json" in record.error
    assert "FAILED in latency (kept: perplexity, tasks," in output  # the table folds the rest
    # Its retry, after someone deleted the run's logs folder: the folder comes back, no worker traceback.
    import shutil

    shutil.rmtree(out / "full" / "logs")
    retry = _run_cli(["run", "--resume", str(out / "full"), "--retry-failed"])
    output = retry.communicate(timeout=300)[0]
    assert retry.returncode == 1 and "Traceback" not in output and "logs/" not in output, output
    assert (out / "full" / "logs" / "fake__disk-full.log").is_file()


def test_a_cache_entry_swapped_in_from_another_variant_fails_its_cell(tiny_model, tiny_suite, tmp_path):
    """Copying a w4g32 entry, manifest and all, over the w8g32 key once
    reported w4g32's figures as w8g32's with exit 0."""
    import shutil

    from qbench.core.paths import cache_dir
    from tests.conftest import RTN_PLUGIN

    common = ["--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu", "--plugins-dir",
              str(RTN_PLUGIN), "-o", str(tmp_path)]
    first = _run_cli(["run", *common, "-b", "rtn:w8g32,rtn:w4g32", "--run-id", "first"])
    assert first.communicate(timeout=300)[0] and first.returncode == 0
    records = ResultStore(tmp_path / "first").latest()
    entries = cache_dir() / "artifacts" / "rtn"
    int8, int4 = (entries / records[cell].artifact.key for cell in ("rtn:w8g32", "rtn:w4g32"))
    shutil.rmtree(int8)
    shutil.copytree(int4, int8)
    second = _run_cli(["run", *common, "-b", "rtn:w8g32", "--run-id", "second"])
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 1 and "Traceback" not in output, output
    record = ResultStore(tmp_path / "second").latest()["rtn:w8g32"]
    assert record.status == "failed" and record.phase == "quantize" and record.value("kld") is None
    assert "was written under key" in record.error and "for rtn:w4g32" in record.error and "rm -r" in record.error


def test_a_baseline_reference_copied_from_another_run_fails_the_cells_that_read_it(tiny_model, tiny_suite,
                                                                                   tmp_path):
    """Same suite, same windows: only the reference's own identity (run,
    model, sha256) tells that it is not this run's baseline."""
    import shutil

    runs = {}
    for name in ("a", "b"):
        runs[name] = create_run(model=str(tiny_model), suite=str(tiny_suite), backends=["fake:uniform"],
                                device="cpu", plugin_dirs=(str(FAKE_PLUGINS),), output_dir=str(tmp_path),
                                run_id=name)
        execute(*runs[name], select=lambda cell: cell.baseline)
    shutil.rmtree(runs["b"][1] / "reference")
    shutil.copytree(runs["a"][1] / "reference", runs["b"][1] / "reference")
    execute(*runs["b"])
    record = ResultStore(runs["b"][1]).latest()["fake:uniform"]
    assert record.status == "failed" and record.phase == "perplexity"
    assert "was written for run_id a, this run's is b: it was copied from another run" in record.error


def test_a_relative_budget_against_a_baseline_at_zero_is_refused_before_any_other_cell(tiny_model, tmp_path):
    """acc>=0.99*base with a baseline accuracy of 0 once called int4 (KLD
    0.64) a pass. Twenty items whose two choices are the same text: the
    first is always picked, the gold is the second, so the baseline scores 0."""
    folder = tmp_path / "suite"
    folder.mkdir()
    item = {"context": "The answer is", "choices": [" yes", " yes"], "gold": 1}
    (folder / "t.jsonl").write_text("".join(json.dumps(item) + "\n" for _ in range(20)))
    (folder / "s.yaml").write_text("name: zero\nperplexity:\n  corpus: {source: 'builtin:pydoc-topics'}\n"
                                   "  max_tokens: 300\n  max_length: 64\ntasks:\n  - {name: t, path: t.jsonl}\n")
    proc = _run_cli(["search", "--budget", "acc>=0.99*base", "-b", "fp:bf16", "-m", str(tiny_model), "-s",
                     str(folder / "s.yaml"), "--device", "cpu", "-o", str(tmp_path), "--run-id", "s"])
    output = proc.communicate(timeout=300)[0]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in output, output
    assert "the baseline's accuracy is 0.0000 ± 0.0000 (95%, 20 items), an interval that reaches 0" in errors[0]
    assert [r.cell for r in ResultStore(tmp_path / "s" / "cells").records()] == ["fp:fp32"]


def test_a_cell_killed_in_a_later_phase_keeps_the_phases_it_finished(tiny_model, tiny_suite, tmp_path):
    """The worker hands each finished phase's figures to the runner as it
    goes: a cell killed at its timeout during latency keeps its quality."""
    out = tmp_path / "out"
    proc = _run_cli(["run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu", "-b",
                     "fake:hang-in-latency", "--plugins-dir", str(FAKE_PLUGINS), "-o", str(out), "--run-id", "hung",
                     "--cell-timeout", "25"])
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "Traceback" not in output, output
    record = ResultStore(out / "hung").latest()["fake:hang-in-latency"]
    assert record.phase == "latency" and "timed out after 25s during latency" in record.error
    assert record.completed_phases == ["perplexity", "tasks", "generation"] and record.value("acc") is not None


def test_time_estimate_counts_artifact_builds_the_cache_lacks_and_each_latency_trial(tmp_path):
    """By hand: cell a measured in 70 s after a 30 s build (not cached now),
    trials 20 and 22 s; cell b 50 s with its artifact cached (built in 400 s
    under another suite); cell c never ran here: the median cell (60 s) and
    the median trial (21 s)."""
    from qbench.execute.estimate import estimate, past_costs
    from tests.conftest import make_record

    def record(cell, **fields):
        return make_record(cell=cell, backend=cell.split(":")[0], variant=cell.split(":")[1],
                           suite={"name": "s", "path": "s.yaml", "hash": fields.pop("suite", "h")}, **fields)

    run = tmp_path / "old"
    run.mkdir()
    store = ResultStore(run)
    store.append(record("a:x", wall_seconds=100.0, phase_seconds={"quantize": 30.0}, trial_wall_seconds=[20.0, 22.0],
                        artifact={"key": "k1", "cache_hit": False, "path": "p"}, finished=1.0,
                        metrics={"quantize_seconds": {"value": 30.0, "unit": "s"}}))
    store.append(record("b:y", wall_seconds=50.0, artifact={"key": "k2", "cache_hit": True, "path": "p"},
                        finished=1.0, metrics={"quantize_seconds": {"value": 400.0, "unit": "s"}}))
    other = tmp_path / "other"
    other.mkdir()  # a run of another suite: not this one's time
    ResultStore(other).append(record("b:y", suite="other", wall_seconds=900.0, finished=2.0))
    costs = past_costs(tmp_path, "f", "h", "cpu")
    assert costs["a:x"] == (70.0, [20.0, 22.0], 30.0, "k1") and costs["b:y"] == (50.0, [], 400.0, "k2")
    found = estimate([("a:x", "a"), ("b:y", "b"), ("c:z", "c")], costs, trials=3,
                     cached=lambda backend, key: (backend, key) == ("b", "k2"))
    assert found.builds == {"a:x": 30.0} and found.unknown == ["c:z"]
    assert found.workers == {"a:x": 100.0, "a:x · latency trial 2 of 3": 20.0, "a:x · latency trial 3 of 3": 22.0,
                             "b:y": 50.0, "b:y · latency trial 2 of 3": 21.0, "b:y · latency trial 3 of 3": 21.0,
                             "c:z": 60.0, "c:z · latency trial 2 of 3": 21.0, "c:z · latency trial 3 of 3": 21.0}
    assert found.seconds == 336.0
    # Nothing cached: b's build counts too.
    assert estimate([("b:y", "b")], costs, 1, lambda backend, key: False).workers == {"b:y": 450.0}


def test_the_fork_servers_preload_starts_no_thread_and_no_backend_library():
    """Workers fork from a server that ran qbench.execute.preload: a thread started
    there would be missing, its locks possibly held, in every worker."""
    import subprocess
    import sys

    code = ("import os, sys; import torch; before = len(os.listdir('/proc/self/task')); import qbench.execute.preload; "
            "print(before, len(os.listdir('/proc/self/task')), torch.cuda.is_initialized(), "
            "[m for m in ('torchao', 'bitsandbytes', 'gptqmodel', 'onnxruntime', 'llama_cpp') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after, cuda, backends = out.stdout.split(" ", 3)
    assert after == before and cuda == "False" and backends.strip() == "[]", out.stdout


def test_a_cells_artifact_is_built_in_a_process_of_its_own(tiny_model, tiny_suite, tmp_path, monkeypatch):
    """A quantization library may leave its process changed (gptqmodel's
    left a CPU decode 2x slower): the worker that measures only loads, from
    the cache, what a child process built; the child's errors are the cell's."""
    monkeypatch.setenv("QBENCH_FAKE_MARKER_DIR", str(tmp_path))
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))

    def run(name):
        plan, run_dir = create_run(model=str(tiny_model), suite=str(tiny_suite), device="cpu", backends=["fake:uniform"],
                                   plugin_dirs=(str(FAKE_PLUGINS),), output_dir=str(tmp_path / "out"), run_id=name)
        execute(plan, run_dir)
        return ResultStore(run_dir).latest()["fake:uniform"]

    record = run("first")
    assert record.ok and record.artifact.cache_hit is False
    (built, builder, builder_parent), = [line.split() for line in (tmp_path / "builds").read_text().splitlines()]
    (_, _, worker), = [line.split() for line in (tmp_path / "loads").read_text().splitlines() if line[0] == "u"]
    assert built == "uniform" and builder_parent == worker and builder != worker
    assert run("second").artifact.cache_hit is True  # built once
    assert len((tmp_path / "builds").read_text().splitlines()) == 1
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("QBENCH_FAKE_BUILD_FAILS", "1")
    failed = run("third")
    assert not failed.ok and failed.phase.startswith("quantize")
    assert "scripted failure while building the artifact" in failed.error
