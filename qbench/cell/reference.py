"""The baseline's reference, as the baseline cell leaves it in the run
folder: its top-k distributions on the perplexity windows (for fidelity)
and its greedy outputs (for generation agreement). Later cells read it.

Like a cache entry, the reference proves what it is: its meta file names the
run, the model and the baseline cell it was written by, the windows it
covers and the sha256 of its tensors, and a reader checks all of them, so a
reference copied in from another run (same suite, another model or
baseline) fails the cell instead of giving every row a wrong KLD."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from qbench.core.errors import QBenchError
from qbench.core.io import write_atomic

if TYPE_CHECKING:  # torch stays out of the parent process until a worker needs it
    from qbench.metrics.scoring import Reference


class BaselineReference:
    """Owns ``<run>/reference/``: what is written there and how it is read.
    ``identity`` (run id, model fingerprint, baseline cell) is written with
    the reference and must match when it is read."""

    def __init__(self, run_dir: Path, identity: Optional[dict[str, str]] = None):
        self.dir = Path(run_dir) / "reference"
        self.logprobs = self.dir / "logprobs.safetensors"
        self.meta = self.dir / "meta.json"
        self.generation_file = self.dir / "generation.json"
        self.identity = dict(identity or {})

    def _files(self, length: Optional[int]) -> tuple[Path, Path]:
        """(tensors, meta) of the row's own windows (``length`` None) or of
        one more length of a context sweep."""
        if length is None:
            return self.logprobs, self.meta
        return self.dir / f"logprobs-ctx{length}.safetensors", self.dir / f"meta-ctx{length}.json"

    def save_scores(
        self, reference: Reference, windows_hash: str, top_k: int, cell: str, length: Optional[int] = None
    ) -> None:
        from qbench.core.io import file_digest

        logprobs, meta = self._files(length)
        # The tensors first, the meta file last: meta present means complete.
        write_atomic(logprobs, reference.save)
        write_atomic(
            meta,
            json.dumps(
                {
                    "windows": windows_hash,
                    "top_k": top_k,
                    "cell": cell,
                    "tokens": int(reference.token_logprobs.numel()),
                    "sha256": file_digest(logprobs),
                    **self.identity,
                }
            ),
        )

    def _check_identity(self, stored: dict, what: Path) -> None:
        fix = f"delete {self.dir} and rerun the baseline (qbench run --resume RUN --retry-failed)"
        for key, wanted in self.identity.items():
            if key in stored and stored[key] != wanted:
                raise QBenchError(
                    f"the baseline reference {what} was written for {key} {stored[key]}, this run's "
                    f"is {wanted}: it was copied from another run; {fix}"
                )

    def load_scores(self, windows_hash: str, length: Optional[int] = None) -> Optional[Reference]:
        """The stored distributions (of one more ``length`` of a context
        sweep when given), or None when the baseline left none (it failed).
        A reference over other windows is an error: the suite or tokenizer
        changed between cells."""
        from qbench.core.io import file_digest

        logprobs, meta_file = self._files(length)
        if not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text())
            stored = meta["windows"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            raise QBenchError(
                f"the baseline reference {meta_file} is unreadable: rerun the baseline with "
                f"`qbench run --resume RUN --retry-failed` after deleting {self.dir}"
            ) from None
        if not isinstance(meta, dict) or stored != windows_hash:
            raise QBenchError(
                "the baseline's windows differ from this cell's: the suite or tokenizer changed "
                "mid-run; start a new run instead of resuming"
            )
        self._check_identity(meta, meta_file)
        if "sha256" in meta and logprobs.is_file() and file_digest(logprobs) != meta["sha256"]:
            raise QBenchError(
                f"the baseline reference {logprobs} differs from what the baseline wrote "
                f"(sha256): delete {self.dir} and rerun the baseline"
            )
        from qbench.metrics.scoring import Reference

        try:
            return Reference.load(logprobs)
        except Exception as exc:  # safetensors raises its own error types for torn files
            raise QBenchError(
                f"the baseline reference {logprobs} is unreadable ({type(exc).__name__}): "
                f"delete {self.dir} and rerun the baseline"
            ) from None

    def save_generation(self, outputs: list[list[int]]) -> None:
        write_atomic(self.generation_file, json.dumps({"outputs": outputs, **self.identity}))

    def load_generation(self) -> Optional[list[list[int]]]:
        if not self.generation_file.is_file():
            return None
        try:
            stored = json.loads(self.generation_file.read_text())
        except (OSError, ValueError, RecursionError):
            stored = None
        if isinstance(stored, list):  # written before the reference named its run
            stored = {"outputs": stored}
        outputs = stored.get("outputs") if isinstance(stored, dict) else None
        if not isinstance(outputs, list) or not all(isinstance(o, list) for o in outputs):
            raise QBenchError(
                f"the baseline's generations {self.generation_file} are unreadable: delete it and rerun the baseline"
            ) from None
        self._check_identity(stored, self.generation_file)
        return outputs
