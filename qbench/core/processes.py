"""What every child process qbench starts does first (a cell's worker, an
artifact's build)."""

from __future__ import annotations

import sys


def die_with_parent() -> None:
    """Let the kernel kill this process when the one that started it exits
    (a worker's fork server, a build's worker). The fork server exits with
    whoever started it, so a runner killed outright, or a Ray worker lost
    with its node's task, never leaves a cell measuring, or an artifact
    building, without anyone to read its result. Linux only (prctl);
    elsewhere nothing changes."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
