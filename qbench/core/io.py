"""Files written so that a killed process never leaves half of one."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Union


def write_atomic(path: Path, content: Union[str, bytes, Callable[[Path], None]]) -> None:
    """Write ``content`` (text, bytes, or a function that writes a given
    path) to a temporary file beside ``path``, then rename it into place:
    readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_digest(path: Path) -> str:
    """The sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
