"""The baseline's reference, as the baseline cell leaves it in the run
folder: its top-k distributions on the perplexity windows (for fidelity)
and its greedy outputs (for generation agreement). Later cells read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from qbench.errors import QBenchError
from qbench.io import write_atomic

if TYPE_CHECKING:  # torch stays out of the parent process until a worker needs it
    from qbench.metrics.scoring import Reference


class BaselineReference:
    """Owns ``<run>/reference/``: what is written there and how it is read."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "reference"
        self.logprobs = self.dir / "logprobs.safetensors"
        self.meta = self.dir / "meta.json"
        self.generation_file = self.dir / "generation.json"

    def save_scores(self, reference: "Reference", windows_hash: str, top_k: int, cell: str) -> None:
        # The tensors first, the meta file last: meta present means complete.
        write_atomic(self.logprobs, reference.save)
        write_atomic(self.meta, json.dumps({"windows": windows_hash, "top_k": top_k, "cell": cell,
                                            "tokens": int(reference.token_logprobs.numel())}))

    def load_scores(self, windows_hash: str) -> Optional["Reference"]:
        """The stored distributions, or None when the baseline left none
        (it failed). A reference over other windows is an error: the suite
        or tokenizer changed between cells."""
        if not self.meta.is_file():
            return None
        try:
            meta = json.loads(self.meta.read_text())
            stored = meta["windows"]
        except (OSError, ValueError, KeyError, TypeError):
            raise QBenchError(f"the baseline reference {self.meta} is unreadable: rerun the baseline with "
                              f"`qbench run --resume RUN --retry-failed` after deleting {self.dir}") from None
        if stored != windows_hash:
            raise QBenchError("the baseline's windows differ from this cell's: the suite or tokenizer changed "
                              "mid-run; start a new run instead of resuming")
        from qbench.metrics.scoring import Reference

        try:
            return Reference.load(self.logprobs)
        except Exception as exc:  # safetensors raises its own error types for torn files
            raise QBenchError(f"the baseline reference {self.logprobs} is unreadable ({type(exc).__name__}): "
                              f"delete {self.dir} and rerun the baseline") from None

    def save_generation(self, outputs: list[list[int]]) -> None:
        write_atomic(self.generation_file, json.dumps(outputs))

    def load_generation(self) -> Optional[list[list[int]]]:
        if not self.generation_file.is_file():
            return None
        try:
            outputs = json.loads(self.generation_file.read_text())
        except (OSError, ValueError):
            raise QBenchError(f"the baseline's generations {self.generation_file} are unreadable: delete it and "
                              "rerun the baseline") from None
        return outputs
