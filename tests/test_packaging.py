"""qbench as a user installs it: a wheel, not a checkout. The wheel is built,
installed with --no-deps into a fresh virtual environment that borrows this
environment's packages (torch and the rest) through a .pth file, and run from
an empty folder, so nothing can come from the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

#: Shipped data the main job needs: every file of these kinds under suites/.
DATA_SUFFIXES = (".yaml", ".jsonl", ".md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (found,) = out.glob("qbench-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; the rest comes from this environment."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # Borrowed packages come after the venv's own: its qbench wins. A .pth in a
    # borrowed folder is not run, so this environment's editable qbench stays off.
    (purelib / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return venv


def run_installed(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QBENCH_RESULTS")}
    return subprocess.run([str(venv / "bin" / "qbench"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def test_wheel_carries_every_shipped_suite_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(REPO / "suites") for p in (REPO / "suites").rglob("*")
               if p.suffix in DATA_SUFFIXES and "__pycache__" not in p.parts]
    assert len(shipped) >= 8
    missing = [str(p) for p in shipped if f"qbench_suites/{p.as_posix()}" not in names]
    assert not missing, f"data files missing from the wheel: {missing}"
    assert "qbench/__main__.py" in names and "qbench_plugins/fp.py" in names


def test_installed_wheel_lists_suites_and_runs_from_an_empty_folder(installed, tiny_model, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import qbench, qbench_suites; "
                            "print(qbench.__file__); print(qbench_suites.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(installed)) for path in where), where  # not the checkout
    proc = run_installed(installed, "suites", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {"default", "smoke"} <= {s["suite"] for s in json.loads(proc.stdout)}
    proc = run_installed(installed, "--version", cwd=tmp_path)
    assert proc.returncode == 0 and "0.1.0" in proc.stdout
    proc = subprocess.run([str(installed / "bin" / "python"), "-m", "qbench", "--version"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == run_installed(installed, "--version", cwd=tmp_path).stdout
    proc = run_installed(installed, "run", "--model", str(tiny_model), "--suite", "smoke", "-b", "fp:bf16",
                         "--device", "cpu", "--run-id", "from-wheel", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Results land in ./results of the folder the user stands in, said as an absolute path.
    results = tmp_path / "results" / "from-wheel" / "results.jsonl"
    assert f"results: {results}" in proc.stderr
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["cell"] for r in records] == ["fp:fp32", "fp:bf16"] and all(r["status"] == "ok" for r in records)
    assert len(records[1]["tasks"]) == 4  # the smoke suite's task data came from the wheel


def test_empty_backend_list_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qbench", "backends"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "QBENCH_PLUGINS": "", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "no backends loaded" in proc.stderr and "QBENCH_PLUGINS" in proc.stderr
