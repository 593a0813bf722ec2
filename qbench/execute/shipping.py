"""Files that travel to a Ray node through the object store, for clusters
whose nodes do not share a file system with the driver (``--ray-files
ship``).

What a cell reads is packed once per run: the model folder, the suite file
and its data files (with the folders of local lm-eval task files, whose
``include:`` and ``!function`` files sit beside them) and the plugin folders.
A node writes that pack once under its temporary folder, each file at its
absolute path below a root named by the pack's digest, so relative paths
between them (a suite's data files) still resolve. The run folder's small
shared files (the baseline's reference, the measured bandwidth, the machine
canary's history) travel with every task, and what the worker adds to them
comes back with its result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qbench.core.io import write_atomic
from qbench.core.paths import file_lock

#: Run-folder files a worker reads and may write (see qbench.cell.reference,
#: qbench.metrics.roofline and qbench.metrics.canary).
RUN_FILES = (
    "reference/logprobs.safetensors",
    "reference/meta.json",
    "reference/generation.json",
    "bandwidth.json",
    "machine_canary.json",
)
CANARY = "machine_canary.json"


def pack(paths: Iterable[Path]) -> dict[str, bytes]:
    """Every file under each path (a file, or a folder and its subfolders),
    keyed by absolute path. Symbolic links are followed (a hub snapshot's
    files are links into its blob store)."""
    files: dict[str, bytes] = {}
    for path in paths:
        path = _absolute(path)
        for found in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            if found.is_file():
                files[str(found)] = found.read_bytes()
    return files


def digest(files: dict[str, bytes]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(files):
        hasher.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return hasher.hexdigest()[:16]


def unpack(files: dict[str, bytes]) -> Path:
    """Write a pack once per node (concurrent tasks wait for the first):
    the root its files lie under, each at its absolute path."""
    root = Path(tempfile.gettempdir()) / "qbench-ray" / digest(files)
    done = root / ".complete"
    with file_lock(root.with_name(root.name + ".lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            for name, content in files.items():
                target = under(root, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            done.write_text("")
    return root


def under(root: Path, path: str) -> Path:
    """Where the absolute ``path`` of the driver lies below ``root``."""
    absolute = _absolute(path)
    return root / absolute.relative_to(absolute.anchor)


def _absolute(path) -> Path:
    """Absolute, with ``..`` folded away by name (not by following links: a
    hub snapshot's files are links, and must keep their snapshot names)."""
    return Path(os.path.normpath(Path(path).absolute()))


def read_run_files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in RUN_FILES if (run_dir / name).is_file()}


def write_run_files(run_dir: Path, files: dict[str, bytes]) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        write_atomic(run_dir / name, content)


def changed_run_files(run_dir: Path, shipped: dict[str, bytes], log: Path) -> dict[str, Any]:
    """What a worker left in its node's run folder for the driver: the run
    files it created or changed, the canary entries it added, its log."""
    back: dict[str, Any] = {}
    for name in RUN_FILES:
        path = run_dir / name
        if name != CANARY and path.is_file() and shipped.get(name) != (content := path.read_bytes()):
            back[name] = content
    before = len(_entries(shipped.get(CANARY)))
    after = _entries((run_dir / CANARY).read_bytes()) if (run_dir / CANARY).is_file() else []
    back["canary_entries"] = after[before:]
    back["log"] = log.read_bytes() if log.is_file() else b""
    return back


def receive_run_files(run_dir: Path, back: dict[str, Any], log: Path) -> None:
    """Put what a worker brought back into the driver's run folder: files
    wrote (the baseline's reference; the run's bandwidth unless another
    cell measured it first), its canary entries appended, its log added to
    the cell's log."""
    for name, content in back.items():
        if name in RUN_FILES and not (name == "bandwidth.json" and (run_dir / name).exists()):
            write_atomic(run_dir / name, content)
    if back.get("canary_entries"):
        path = run_dir / CANARY
        entries = _entries(path.read_bytes()) if path.is_file() else []
        write_atomic(path, json.dumps(entries + back["canary_entries"]))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        handle.write(back.get("log", b""))


def _entries(content) -> list:
    try:
        entries = json.loads(content) if content else []
    except ValueError:
        return []
    return entries if isinstance(entries, list) else []
