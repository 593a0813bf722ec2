"""Reading the data files a suite points to, which may come from someone
else: text only, and (unless the user allows it) only inside the suite's
own folder."""

from __future__ import annotations

from pathlib import Path

from qbench.core.errors import QBenchError

#: Largest data file a suite may point to (the work a shared suite can cause is bounded).
MAX_DATA_BYTES = 2**30
#: The switch that lets a suite read files outside its folder.
ALLOW_FLAG = "--allow-outside-data"


def read_text(path: Path) -> str:
    """A data file's text, or a one-line error when it is unreadable, binary
    or not UTF-8."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_DATA_BYTES:
            raise QBenchError(
                f"{path} has {size / 2**30:.1f} GiB, more than the {MAX_DATA_BYTES // 2**30} GiB "
                "qbench reads from one data file: cut it to what the suite evaluates"
            )
        data = Path(path).read_bytes()
    except OSError as exc:
        raise QBenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in data[:65536]:
        raise QBenchError(f"{path} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QBenchError(f"{path} is not UTF-8 text (byte {exc.start}): re-save it as UTF-8") from None


def check_inside(path: Path, root: Path, suite_file: Path) -> Path:
    """``path`` resolved (symlinks too), refused when it lies outside
    ``root``, the suite file's folder: a shared suite must not quietly read
    ``../../etc/passwd`` or ``~/.ssh``. ``--allow-outside-data`` lifts it."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise QBenchError(
            f"{suite_file}: data file {resolved} lies outside the suite's folder {root}; move it "
            f"beside the suite, or pass {ALLOW_FLAG} if you trust this suite"
        )
    return resolved
