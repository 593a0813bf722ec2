"""What every child process qbench starts does first (a cell's worker, an
artifact's build)."""

from __future__ import annotations

import sys


def quiet_library_logs() -> None:
    """torchao 0.18 registers enums that torch 2.14 calls deprecated, with a
    warning each time torchao is imported: a note for torchao's authors, not
    for whoever runs qbench. Every process that prints to the user's
    terminal and may import torchao (the command itself, the embedded
    model's conversion) calls this first."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


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
