"""Progress of long backend steps (a GPTQ quantization takes minutes).

A backend calls ``report("layer 3 of 30")``; inside a worker the runner shows
it on the cell's status line (and the cell's log keeps it), elsewhere it does
nothing. Backends need no reference to the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

_sink: Optional[Callable[[str], None]] = None


def set_sink(sink: Optional[Callable[[str], None]]) -> None:
    global _sink
    _sink = sink


def report(text: str) -> None:
    if _sink is not None:
        _sink(text)
