"""Where qbench keeps caches and results."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QBENCH_CACHE``, else ``$XDG_CACHE_HOME/qbench``, else ``~/.cache/qbench``."""
    if env := os.environ.get("QBENCH_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qbench"


def results_dir() -> Path:
    return Path(os.environ.get("QBENCH_RESULTS", "results"))


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock so two runs never build the same cache entry at once.
    A cache folder that cannot hold the lock file is one line naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as exc:
        from qbench.core.errors import QBenchError

        raise QBenchError(
            f"cannot create the lock file {path} ({exc.strerror or exc}): the cache folder is not "
            "writable; set $QBENCH_CACHE to a folder you can write to"
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
