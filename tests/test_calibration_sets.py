"""Calibration as an axis: named calibration sets in a suite, picked per
cell with ``calibration=NAME``, recorded, and kept apart in the cache."""

import textwrap

import pytest

from qbench.core.errors import QBenchError
from qbench.data.suites import load_suite

CODE = "\n\n".join(f"def f{i}(x):\n    return [x * {i} for _ in range({i})]" for i in range(40))


@pytest.fixture
def two_set_suite(tiny_suite, tmp_path):
    (tmp_path / "code.txt").write_text(CODE)
    (tmp_path / "mc.jsonl").write_text((tiny_suite.parent / "mc.jsonl").read_text())
    path = tmp_path / "two.yaml"
    path.write_text(tiny_suite.read_text() + textwrap.dedent("""
        calibration_sets:
          code:
            corpus: {source: code.txt}
            samples: 2
            seq_len: 32
    """))
    return path


def test_named_sets_resolve_and_unknown_ones_say_which_exist(two_set_suite):
    suite = load_suite(str(two_set_suite))
    assert suite.calibration_spec("default") is suite.calibration
    assert suite.calibration_spec("code").corpus.source == "code.txt"
    with pytest.raises(QBenchError, match="no calibration set 'prose': choose one of default, code"):
        suite.calibration_spec("prose")


def test_a_set_cannot_be_called_default(tmp_path, tiny_suite):
    path = tmp_path / "bad.yaml"
    path.write_text(tiny_suite.read_text() + "calibration_sets:\n  default: {corpus: {source: 'builtin:pydoc-topics'}}\n")
    with pytest.raises(QBenchError, match="cannot name a set 'default'"):
        load_suite(str(path))


def test_each_set_calibrates_its_own_artifact_and_is_recorded(tiny_model, two_set_suite, tmp_path):
    """int8-static's activation scales come from the calibration samples: code
    and prose give different scales, so different artifacts and figures."""
    import qbench
    from qbench.execute.results import ResultStore

    cells = ["torchao:int8-static", "torchao:int8-static:calibration=code"]
    df = qbench.run(model=str(tiny_model), suite=str(two_set_suite), backends=cells, device="cpu",
                    output_dir=str(tmp_path / "out"))
    records = ResultStore(df.attrs["run_dir"]).latest()
    prose, code = records[cells[0]], records[cells[1]]
    assert prose.ok and code.ok, (prose.error, code.error)
    assert (prose.calibration.name, code.calibration.name) == ("default", "code")
    assert (prose.calibration.samples, code.calibration.samples) == (2, 2)
    assert prose.calibration.hash != code.calibration.hash
    assert prose.artifact.key != code.artifact.key
    assert prose.value("kld") != code.value("kld")
    from pathlib import Path

    from qbench.present.report import write_report

    report = write_report(Path(df.attrs["run_dir"]))[0].read_text()
    assert "code (2 samples)" in report and "default (2 samples)" in report
