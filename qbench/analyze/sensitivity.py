"""Per-unit sensitivity: which layers hurt most when quantized.

One unit (a linear layer, a layer type across all blocks, or a decoder
block) is quantized at a time, everything else left in full precision
(``only``), or everything the variant quantizes except that unit
(``all-but``, the converse). Each configuration is scored on the suite's
perplexity windows against the fp32 baseline's stored reference, with the
same KLD and top-1 statistics as a run's fidelity columns.

It runs in one process over one loaded model: a backend that supports it
(``Backend.layer_quantizer``) quantizes the unit's layers in place and puts
the full-precision weights back afterwards, so a unit costs one scoring
pass, not a worker process and a model load. The baseline runs once per
folder and its reference is kept there; rows are appended to
``sensitivity.jsonl`` as each unit finishes, so an interrupted pass resumes
where it stopped.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel

from qbench.core.errors import QBenchError
from qbench.core.io import write_atomic
from qbench.core.records import Metric

UNIT_KINDS = ("layer", "type", "block")
#: The unit of sensitivity and of search, one default for both: a layer type
#: across blocks (*.down_proj), a handful of units where layers are hundreds.
DEFAULT_UNIT = "type"
MODES = ("only", "all-but")
ROWS_FILE, REFERENCE_FILE, SETTINGS_FILE = "sensitivity.jsonl", "reference.safetensors", "sensitivity.json"
HEATMAP_FILE = "sensitivity_heatmap.png"
_BLOCK = re.compile(r"\.(\d+)\.")


class SensitivityRow(BaseModel):
    """One unit's figures against the baseline."""

    unit: str
    layers: list[str]
    mode: Literal["only", "all-but"]
    kld: Metric
    same_top_p: Metric
    ln_ppl_ratio: Metric
    seconds: float


def block_of(name: str) -> Optional[int]:
    """The decoder block a layer belongs to (``model.layers.7.mlp.down_proj``: 7)."""
    found = _BLOCK.search(name)
    return int(found.group(1)) if found else None


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def units(names: list[str], kind: str) -> dict[str, list[str]]:
    """The layers of each unit, in model order. ``type`` units are named as
    ``keep`` patterns (``*.down_proj``); a layer outside any block (an output
    head) is its own ``block`` unit."""
    if kind not in UNIT_KINDS:
        raise QBenchError(f"unknown unit '{kind}': choose one of {', '.join(UNIT_KINDS)}")
    out: dict[str, list[str]] = {}
    for name in names:
        if kind == "layer":
            key = name
        elif kind == "type":
            key = f"*.{layer_type(name)}"
        else:
            block = block_of(name)
            key = f"block {block}" if block is not None else name
        out.setdefault(key, []).append(name)
    return out


def ranked(rows: list[SensitivityRow]) -> list[SensitivityRow]:
    """Most harmful first: ``only`` rows by KLD descending (quantizing the
    unit alone hurts most), ``all-but`` rows by KLD ascending (keeping the
    unit in full precision helps most)."""
    return sorted(rows, key=lambda r: r.kld.value if r.mode == "all-but" else -r.kld.value)


def heatmap_matrix(rows: list[SensitivityRow]) -> tuple[list[int], list[str], list[list[Optional[float]]]]:
    """Block x layer type KLD of per-layer rows: (blocks, types, values[block][type])."""
    cells = {
        (block_of(r.unit), layer_type(r.unit)): r.kld.value
        for r in rows
        if len(r.layers) == 1 and block_of(r.unit) is not None
    }
    blocks = sorted({b for b, _ in cells})
    types = list(dict.fromkeys(t for _, t in cells))
    return blocks, types, [[cells.get((b, t)) for t in types] for b in blocks]


def write_heatmap(rows: list[SensitivityRow], path: Path, title: str) -> Optional[Path]:
    blocks, types, values = heatmap_matrix(rows)
    if not blocks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(types), 1.2 + 0.22 * len(blocks)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="KLD (nats)")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


class Scorer:
    """The suite's perplexity windows (cut to ``max_tokens`` scored tokens)
    and the fp32 baseline's reference on them, computed once per folder."""

    def __init__(
        self,
        folder: Path,
        model_path: str,
        suite,
        tokenizer,
        device: str,
        max_tokens: int,
        trust_remote_code: bool = False,
    ):
        from qbench.data.workload import Workload

        windows, total = [], 0
        for window in Workload(suite, tokenizer).perplexity_windows:
            if total >= max_tokens:
                break
            windows.append(window)
            total += window.n_scored
        self.windows, self.device = windows, device
        self.batch_size = suite.perplexity.batch_size
        self.top_k = suite.fidelity.top_k
        self.reference = self._reference(folder / REFERENCE_FILE, model_path, trust_remote_code)

    def _reference(self, path: Path, model_path: str, trust_remote_code: bool):
        from qbench.metrics.scoring import Reference, reference_from, score_windows
        from qbench.sdk.hf import HFSession, load_causal_lm

        if path.exists():
            try:
                reference = Reference.load(path)
            except Exception as exc:  # safetensors raises its own error type for a torn or foreign file
                import warnings

                warnings.warn(
                    f"{path} is unreadable ({type(exc).__name__}): computing the baseline's reference again",
                    stacklevel=2,
                )
            else:
                if reference.token_logprobs.numel() == sum(w.n_scored for w in self.windows):
                    return reference
        session = HFSession(
            load_causal_lm(model_path, trust_remote_code=trust_remote_code).to(self.device), self.device
        )
        reference = reference_from(score_windows(session, self.windows, self.batch_size, top_k=self.top_k))
        write_atomic(path, reference.save)
        return reference

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        from qbench.metrics.quality import fidelity_metrics
        from qbench.metrics.scoring import score_windows
        from qbench.sdk.hf import HFSession

        scores = score_windows(HFSession(model, self.device), self.windows, self.batch_size, self.reference)
        return fidelity_metrics(
            scores.tensor("token_logprobs"),
            self.reference.token_logprobs,
            scores.tensor("kld"),
            scores.tensor("same_top"),
            scores.tensor("tail_mass"),
            self.top_k,
        )


def measure(
    quantizer,
    scorer: Scorer,
    unit_layers: dict[str, list[str]],
    mode: Literal["only", "all-but"],
    done: set[str],
    on_row: Callable[[SensitivityRow], None],
) -> None:
    """Score each unit not in ``done``; the quantizer's model is back in full
    precision after each."""
    if mode not in MODES:
        raise QBenchError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
    everything = [name for layers in unit_layers.values() for name in layers]
    for unit, layers in unit_layers.items():
        if unit in done:
            continue
        chosen = layers if mode == "only" else [n for n in everything if n not in layers]
        started = time.perf_counter()
        saved = quantizer.quantize(chosen)
        try:
            figures = scorer.score(quantizer.model)
        finally:
            quantizer.restore(saved)
        on_row(
            SensitivityRow(
                unit=unit,
                layers=layers,
                mode=mode,
                kld=figures["kld"],
                same_top_p=figures["same_top_p"],
                ln_ppl_ratio=figures["ln_ppl_ratio"],
                seconds=time.perf_counter() - started,
            )
        )


def load_rows(folder: Path) -> list[SensitivityRow]:
    path = folder / ROWS_FILE
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(SensitivityRow.model_validate_json(line))
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                # A pass killed while appending its last row: that unit is measured again.
                write_atomic(path, "".join(f"{kept}\n" for kept in lines[:-1]))
                break
            raise QBenchError(
                f"{path}: line {number} is not a sensitivity row: delete that line and rerun to measure the unit again"
            ) from None
    else:
        if text and not text.endswith("\n"):  # a whole last row cut before its newline: the next one starts a line
            write_atomic(path, text + "\n")
    return rows


def check_not_a_run(folder: Path, what: str) -> None:
    """A pass or a search never writes into a run's folder."""
    if (folder / "plan.json").is_file():
        raise QBenchError(f"{folder} is a run folder (it holds plan.json), not {what}: choose another --run-id")


def check_settings(
    folder: Path, settings: dict[str, Any], file: str = SETTINGS_FILE, what: str = "a sensitivity pass"
) -> None:
    """A folder holds one pass (or search): resuming with other settings would mix rows."""
    path = folder / file
    check_not_a_run(folder, what)
    if path.exists():
        try:
            before = json.loads(path.read_text())
            if not isinstance(before, dict):
                raise ValueError(type(before).__name__)
        except ValueError:
            raise QBenchError(
                f"{path} is not the JSON qbench wrote: choose another --run-id, or delete the folder "
                "to measure it again"
            ) from None
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise QBenchError(
                f"{folder} holds {what} with other settings ({', '.join(changed)}): choose another --run-id"
            )
    else:
        write_atomic(path, json.dumps(settings, indent=1))
