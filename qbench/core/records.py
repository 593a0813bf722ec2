"""Typed records: what one line of ``results.jsonl`` holds.

Every record is validated when it is appended and when it is read, so a
line that is not a record (hand-edited, another tool's file) is a one-line
error naming the file and line instead of a KeyError in some view, and a
field holding the wrong thing (once, the artifact cache key overwritten by a
loop variable) fails where it is written.

Schema versions: 1 kept per-task accuracy, the latency trials and the latency
workload inside ``metrics``; 2 gives each its own field, so that every entry
of ``metrics`` is a ``Metric``; 3 adds ``completed_phases`` (a failed cell
keeps the figures of the phases it finished); 4 adds ``context_sweep`` (long
context). Older lines are migrated when read.

Forward compatibility, one rule: every change of the fields raises
``SCHEMA_VERSION``. A line of a newer version is refused as a whole, naming
the version that wrote it (upgrade qbench to read it); it is never called
malformed, since it is a valid record this qbench cannot read.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 4


class NewerSchema(ValueError):
    """A record written by a newer qbench than this one."""

    def __init__(self, version: int):
        super().__init__(
            f"written by a newer qbench (record schema {version}; this qbench reads up to "
            f"{SCHEMA_VERSION}): upgrade qbench (pip install -U qbench) to read it"
        )
        self.version = version


def parse_record(text: str) -> CellRecord:
    """One JSON record, checked for its schema version before its fields:
    ``NewerSchema`` for a newer one, a ``ValueError`` (pydantic's
    ``ValidationError`` is one) for a line that is not a record."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    except RecursionError:
        raise ValueError("the line nests too deeply to be a record") from None
    if isinstance(data, dict):
        version = data.get("schema", SCHEMA_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise NewerSchema(version)
    return CellRecord.model_validate_json(text)


class Metric(BaseModel):
    """One figure: value, unit, sample count and standard error where one
    exists, plus metric-specific keys (percentiles, raw samples, trials,
    label) kept as extra fields and read with ``get``."""

    model_config = ConfigDict(extra="allow")
    value: Optional[float] = None
    unit: str
    n: Optional[int] = None
    stderr: Optional[float] = None

    def get(self, key: str, default: Any = None) -> Any:
        """A metric-specific key (``samples``, ``trials``, ``p99``...)."""
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {}).get(key, default)


class ModelRef(BaseModel):
    name: str
    fingerprint: str
    source: str


class SuiteRef(BaseModel):
    name: str
    path: str
    hash: str
    #: resolved path -> sha256 prefix of every data file the suite read
    data_files: dict[str, str] = {}


class ArtifactRef(BaseModel):
    key: str
    cache_hit: bool
    path: str
    meta: dict[str, Any] = {}
    #: seconds spent checking the cached files' sizes and sha256
    verify_seconds: Optional[float] = None


class CalibrationRef(BaseModel):
    hash: str
    samples: int
    #: the suite's calibration set (``default``: its ``calibration`` section)
    name: str = "default"


class CellRecord(BaseModel):
    """A cell's outcome: a finished measurement (``status: ok``) or a
    failure with the phase it happened in and why."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_version: int = Field(SCHEMA_VERSION, alias="schema", ge=1, le=SCHEMA_VERSION)
    run_id: str
    cell: str
    backend: str
    variant: str
    baseline: bool = False
    device: str
    model: ModelRef
    suite: SuiteRef
    status: Literal["ok", "failed"]
    phase: Optional[str] = None
    error: Optional[str] = None
    log: Optional[str] = None
    #: measurement phases that finished; for a failed cell, the phases whose
    #: figures the record still holds (a disk that filled up during latency
    #: does not take the cell's perplexity with it)
    completed_phases: list[str] = []
    metrics: dict[str, Metric] = {}
    #: per task: acc and acc_norm
    tasks: dict[str, dict[str, Metric]] = {}
    #: raw output of each latency trial (qbench.metrics.trials)
    latency_trials: list[dict[str, Any]] = []
    latency_workload: Optional[dict[str, Any]] = None
    #: per batch size of a sweep (its first is the row's latency): prefill,
    #: decode per step, tokens/s and the roofline share, timed in the cell's
    #: own process
    latency_sweep: dict[int, dict[str, Metric]] = {}
    #: per context length of a long-context suite (``perplexity.max_length``
    #: and ``latency.prompt_tokens`` as lists): perplexity and fidelity on
    #: windows of that length, KV and total memory of one sequence that long,
    #: and decode speed after a prompt that long, each where measured
    context_sweep: dict[int, dict[str, Metric]] = {}
    latency_trial_errors: list[str] = []
    notes: list[str] = []
    config: Optional[dict[str, Any]] = None
    nominal_bits: Optional[float] = None
    backend_version: Optional[str] = None
    artifact: Optional[ArtifactRef] = None
    calibration: Optional[CalibrationRef] = None
    workload: Optional[dict[str, Any]] = None
    session: Optional[dict[str, Any]] = None
    env: Optional[dict[str, Any]] = None
    phase_seconds: dict[str, float] = {}
    started: Optional[float] = None
    finished: Optional[float] = None
    wall_seconds: Optional[float] = None
    trial_wall_seconds: list[float] = []

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("schema", SCHEMA_VERSION) not in (1, 2, 3):
            return data
        if data["schema"] in (2, 3):  # 3 and 4 only added fields with defaults
            return {**data, "schema": SCHEMA_VERSION}
        data = dict(data)
        metrics = dict(data.get("metrics") or {})
        for key in ("tasks", "latency_trials", "latency_workload"):
            if key in metrics:
                data[key] = metrics.pop(key)
        data["metrics"] = metrics
        data["schema"] = SCHEMA_VERSION
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.status == "failed" and not self.error:
            raise ValueError("a failed record must say why (error)")
        return self

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, name: str) -> Optional[float]:
        """A metric's value, or None when the record lacks it."""
        m = self.metrics.get(name)
        return m.value if m is not None else None

    def stderr(self, name: str) -> Optional[float]:
        m = self.metrics.get(name)
        return m.stderr if m is not None else None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    def updated(self, **changes: Any) -> CellRecord:
        """A validated copy with ``changes``."""
        return CellRecord.model_validate({**self.model_dump(by_alias=True), **changes})
