"""Suite files: what to measure, on which data. Same suite => comparable rows."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from qbench.core.datafiles import check_inside, read_text
from qbench.core.errors import QBenchError, describe_validation
from qbench.core.untrusted import load_yaml

#: The package that carries the shipped suites (``suites/`` in a checkout).
SUITES_PACKAGE = "qbench_suites"
BosPolicy = Literal["none", "document", "window"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusSpec(_Strict):
    #: ``builtin:pydoc-topics``, a path to a .txt / .jsonl file (relative to
    #: the suite file), or ``hf:DATASET[:CONFIG]:SPLIT`` (needs `datasets` and a hub)
    source: str
    #: keep documents whose position lies in this fraction range, so evaluation
    #: and calibration can take disjoint parts of one source
    documents: tuple[float, float] = (0.0, 1.0)
    #: field holding the text, for JSONL files
    text_field: str = "text"

    @model_validator(mode="after")
    def _check_range(self):
        lo, hi = self.documents
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"documents range must satisfy 0 <= start < end <= 1, got {self.documents}")
        return self


PerplexityProtocol = Literal["stream", "lm-eval-rolling", "llama.cpp"]


class PerplexitySpec(_Strict):
    corpus: CorpusSpec
    #: stream: the documents joined into one token stream, cut into windows
    #: (GPTQ's protocol; with ``stride``, HF's sliding windows). lm-eval-rolling:
    #: each document on its own, in lm-evaluation-harness's rolling windows
    #: behind its prefix token, with word and byte counts per document as
    #: lm-eval counts them. llama.cpp: llama-perplexity's chunks of
    #: ``max_length`` (its n_ctx), scoring only each chunk's second half.
    protocol: PerplexityProtocol = "stream"
    max_tokens: int = Field(
        16384,
        gt=1,
        description="tokens of the corpus to evaluate (lm-eval-rolling: whole documents up to that many tokens)",
    )
    #: window length in tokens, BOS included (lm-eval-rolling: tokens fed per
    #: window, lm-eval's max_length; llama.cpp: n_ctx). A list measures every
    #: length on the same tokens (long context: ``[512, 2048, 8192]``); the
    #: first is the row's own perplexity and fidelity, each length is
    #: reported in the context sweep.
    max_length: Union[
        Annotated[int, Field(gt=1)], Annotated[list[Annotated[int, Field(gt=1)]], Field(min_length=1, max_length=8)]
    ] = 512
    stride: Optional[int] = Field(
        None, gt=0, description="window step; default max_length (no overlap); stream protocol only"
    )
    #: windows per forward pass at the first length; longer windows are
    #: batched to hold as many tokens (at least one window per pass)
    batch_size: int = Field(2, gt=0)

    @property
    def lengths(self) -> list[int]:
        """The window lengths, the row's own first."""
        return list(self.max_length) if isinstance(self.max_length, list) else [self.max_length]

    def batch_at(self, length: int) -> int:
        """Windows per forward pass at ``length``: the tokens of ``batch_size``
        windows of the first length, so a long window cannot multiply memory."""
        return max(1, self.batch_size * self.lengths[0] // length)

    @model_validator(mode="after")
    def _check_stride(self):
        lengths = self.lengths
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"max_length lists a length twice: {self.max_length}")
        if self.stride is not None and len(lengths) > 1:
            raise ValueError("stride applies to one max_length: give one length, or drop stride")
        if self.stride is not None and self.protocol != "stream":
            raise ValueError(
                f"stride applies to the stream protocol only; protocol {self.protocol} fixes its "
                "own windows: drop stride"
            )
        if self.stride is not None and self.stride > lengths[0]:
            raise ValueError(
                f"stride {self.stride} is longer than max_length {lengths[0]}: tokens between "
                "windows would never be scored"
            )
        if self.protocol == "llama.cpp" and min(lengths) < 4:
            raise ValueError("protocol llama.cpp scores the second half of each chunk: max_length must be >= 4")
        return self


class FidelitySpec(_Strict):
    #: baseline distributions are stored as top-k log-probs plus the rest of the mass
    top_k: int = Field(512, gt=0)


class ChoiceTask(_Strict):
    name: str
    #: JSONL with fields ``context`` (str), ``choices`` (list[str]), ``gold``
    #: (int), or an lm-evaluation-harness task YAML with local data
    path: str
    limit: Optional[int] = Field(None, gt=0)
    #: requests (item x choice) per forward pass: they are short, so batch wide
    batch_size: int = Field(16, gt=0)


class GenerationSpec(_Strict):
    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    max_new_tokens: int = Field(32, gt=0)


class LatencySpec(_Strict):
    #: one prompt length, or several (``[512, 4096]``): the first is the
    #: row's latency (and its trials); each one is timed at the first batch
    #: size in the cell's process and reported in the context sweep, where
    #: the KV cache a decode step reads grows with the prompt
    prompt_tokens: Union[PositiveInt, Annotated[list[PositiveInt], Field(min_length=1, max_length=8)]] = 128
    new_tokens: int = Field(32, gt=1)
    #: one batch size, or a sweep (``[1, 8, 32]``): the first is the row's
    #: latency (and its trials); every one is timed in the cell's process and
    #: reported per batch size, since weight-only kernels that win at batch 1
    #: can lose at larger batches
    batch_size: Union[PositiveInt, Annotated[list[PositiveInt], Field(min_length=1)]] = 1
    # Upper bounds so that a shared suite cannot ask for days of timing (a
    # cell's timeout would end it, but only after the time was spent).
    warmup: int = Field(1, ge=0, le=100)
    min_reps: int = Field(3, gt=0, le=1000)
    min_seconds: float = Field(2.0, ge=0, le=600, allow_inf_nan=False)
    max_reps: int = Field(50, gt=0, le=10_000)
    #: independent worker processes the workload is measured in (each with
    #: its warm-up and repetitions): speed differs between processes more
    #: than between repetitions, so error bars need at least 2.
    trials: int = Field(1, ge=1, le=20)

    @model_validator(mode="after")
    def _distinct_batches(self):
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"batch_size lists a size twice: {self.batch_size}")
        if len(set(self.prompt_lengths)) != len(self.prompt_lengths):
            raise ValueError(f"prompt_tokens lists a length twice: {self.prompt_tokens}")
        return self

    @property
    def prompt_lengths(self) -> list[int]:
        """The prompt lengths, the row's own first."""
        return list(self.prompt_tokens) if isinstance(self.prompt_tokens, list) else [self.prompt_tokens]

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.batch_size) if isinstance(self.batch_size, list) else [self.batch_size]


class LmEvalSpec(_Strict):
    """Tasks run by lm-evaluation-harness on every cell's session."""

    #: ``lm_eval:NAME`` (a task of the installed lm-eval; hub datasets need a
    #: hub) or a task YAML file of the suite's own (relative to the suite file)
    tasks: list[str] = Field(min_length=1)
    limit: Optional[int] = Field(None, gt=0, description="documents per task (all when unset)")
    num_fewshot: Optional[int] = Field(None, ge=0, description="the tasks' own setting when unset")
    batch_size: int = Field(8, gt=0)
    #: tokens fed per request, lm-eval's max_length; default the model's positions (2048 when unknown)
    max_length: Optional[int] = Field(None, gt=1)
    max_gen_toks: int = Field(256, gt=0, description="generation tasks: tokens generated unless the task says")
    bootstrap_iters: int = Field(1000, ge=0, description="lm-eval's bootstrap for stderrs of non-mean metrics")
    #: an installed task's documents from a local file instead of its hub
    #: dataset: ``{TASK: path}`` (JSON lines, JSON, CSV or Parquet in the
    #: dataset's own fields); the task's prompts, filters and metrics stay lm-eval's
    local_data: dict[str, str] = {}

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, tasks: list[str]) -> list[str]:
        twice = sorted({t for t in tasks if tasks.count(t) > 1})
        if twice:
            raise ValueError(f"lm-eval task '{twice[0]}' is listed twice")
        for task in tasks:
            if task.startswith("lm_eval:") and not task[len("lm_eval:") :].strip():
                raise ValueError("'lm_eval:' needs a task name, e.g. lm_eval:hellaswag")
        return tasks

    @model_validator(mode="after")
    def _local_data_for_listed_tasks(self):
        listed = {t[len("lm_eval:") :] for t in self.tasks if t.startswith("lm_eval:")}
        for name in self.local_data:
            if name not in listed:
                raise ValueError(f"local_data names '{name}', which is not among the tasks as lm_eval:{name}")
        return self


class CalibrationSpec(_Strict):
    corpus: CorpusSpec
    samples: int = Field(16, gt=0)
    seq_len: int = Field(256, gt=1)


class QATSpec(_Strict):
    """How quantization-aware training fine-tunes (the ``qat`` backend): on
    the variant's calibration set, its tokens cut into rows of ``seq_len``."""

    steps: int = Field(100, gt=0, description="optimizer steps")
    lr: float = Field(1e-5, gt=0, allow_inf_nan=False, description="AdamW learning rate")
    seq_len: int = Field(256, gt=1, description="tokens per training row")
    batch_size: int = Field(4, gt=0, description="rows per step")


class Suite(_Strict):
    name: str
    description: str = ""
    #: BOS policy for every token sequence the harness builds: none, at the
    #: start of each document, or at the start of every window
    bos: BosPolicy = "none"
    #: how the native multiple-choice tasks place BOS: "lm-eval" tokenizes
    #: their requests as lm-eval's HF model does, so acc and acc_norm are
    #: lm-eval's; "suite" applies ``bos`` to them too
    task_bos: Literal["lm-eval", "suite"] = "lm-eval"
    perplexity: Optional[PerplexitySpec] = None
    fidelity: FidelitySpec = FidelitySpec()
    tasks: list[ChoiceTask] = []
    lm_eval: Optional[LmEvalSpec] = None
    generation: Optional[GenerationSpec] = None
    latency: Optional[LatencySpec] = None
    calibration: Optional[CalibrationSpec] = None
    #: more calibration sets by name, besides ``calibration`` (named
    #: ``default``): a calibrating variant picks one with ``calibration=NAME``
    calibration_sets: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")], CalibrationSpec] = {}
    #: fine-tuning of the ``qat`` backend (its variants may override each field)
    qat: QATSpec = QATSpec()
    #: the rows a run of this suite makes when ``-b`` names none, as ``-b``
    #: takes them (``backend`` or ``backend:variant``); unset: every variant
    #: that runs on the device by default. Which rows run is not what a
    #: cell measures, so it stays out of the suite's hash.
    backends: Optional[list[Annotated[str, Field(min_length=1, max_length=200)]]] = Field(
        None, min_length=1, max_length=100, exclude=True
    )
    #: folder of the suite file; relative data paths resolve against it
    root: str = Field("", exclude=True)
    #: the suite file itself, for messages
    file: str = Field("", exclude=True)
    #: whether data files may lie outside ``root`` (--allow-outside-data)
    allow_outside_data: bool = Field(False, exclude=True)

    @model_validator(mode="after")
    def _rows_name_no_files(self):
        # A suite is untrusted: its rows may not point a backend at a file or
        # a hub id (a recipe, a prequantized checkpoint) that the run would
        # read or download outside the suite's own data rules.
        for row in self.backends or []:
            if re.search(r"(^|[:,])\s*(path|recipe)\s*=", row):
                raise ValueError(
                    f"backends: '{row}' names a file (path= or recipe=): a suite's rows may not; "
                    "give that row with -b on the command line"
                )
        return self

    @model_validator(mode="after")
    def _unique_task_names(self):
        names = [t.name for t in self.tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"task name '{twice[0]}' is used twice: each task needs its own name")
        return self

    @model_validator(mode="after")
    def _calibration_set_names(self):
        if "default" in self.calibration_sets:
            raise ValueError("calibration_sets cannot name a set 'default': that is the 'calibration' section")
        return self

    def calibration_spec(self, name: str = "default") -> Optional[CalibrationSpec]:
        """The calibration set called ``name`` (``default``: the ``calibration`` section)."""
        if name == "default":
            return self.calibration
        if name not in self.calibration_sets:
            known = ["default"] * (self.calibration is not None) + list(self.calibration_sets)
            raise QBenchError(
                f"suite '{self.name}' has no calibration set '{name}': choose one of "
                f"{', '.join(known) or '(none: add a calibration section)'}"
            )
        return self.calibration_sets[name]

    @model_validator(mode="after")
    def _latency_needs_text(self):
        if self.latency and not self.perplexity:
            raise ValueError(
                "latency prompts are cut from the perplexity corpus: add a 'perplexity' section (or drop 'latency')"
            )
        return self

    def resolve(self, relative: str) -> Path:
        """A data path: relative to the suite file's folder, resolved, and
        inside that folder unless the user allowed otherwise."""
        path = Path(relative).expanduser()
        path = (path if path.is_absolute() else Path(self.root) / path).resolve()
        if not self.allow_outside_data:
            check_inside(path, Path(self.root), Path(self.file or self.root))
        return path

    def data_files(self) -> list[Path]:
        files = []
        for task in self.tasks:
            path = self.resolve(task.path)
            files.append(path)
            if path.suffix in (".yaml", ".yml") and path.is_file():
                from qbench.data.lm_eval_tasks import data_file, read_config

                files.append(self.resolve(str(data_file(path, read_config(path)))))
        for entry in self.lm_eval.tasks if self.lm_eval else []:
            if not entry.startswith("lm_eval:"):
                files.append(self.resolve(entry))
        files += [self.resolve(p) for p in (self.lm_eval.local_data.values() if self.lm_eval else [])]
        for corpus in (
            self.perplexity and self.perplexity.corpus,
            self.calibration and self.calibration.corpus,
            *(spec.corpus for spec in self.calibration_sets.values()),
        ):
            if corpus and not corpus.source.startswith(("builtin:", "hf:")):
                files.append(self.resolve(corpus.source))
        return files

    def content_hash(self) -> str:
        """Hash of the settings and of every data file they point to."""
        digest = hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode())
        for path in self.data_files():
            digest.update(path.name.encode())
            digest.update(path.read_bytes() if path.is_file() else b"<missing>")
        return digest.hexdigest()[:16]

    def data_hashes(self) -> dict[str, str]:
        """Each data file's resolved path and sha256, for provenance."""
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in self.data_files() if p.is_file()}


def suites_dir() -> Path:
    """The folder of the shipped suites, wherever qbench is installed (a
    checkout, an editable install or a wheel), found through
    importlib.resources."""
    from importlib.resources import files

    try:
        folder = Path(str(files(SUITES_PACKAGE)))
    except ModuleNotFoundError:
        folder = None
    if folder is None or not folder.is_dir():
        raise QBenchError(
            f"the shipped suites (package {SUITES_PACKAGE}) are missing from this install: reinstall "
            "qbench (pip install --force-reinstall qbench)"
        )
    return folder


def shipped_suites() -> list[Path]:
    """Every shipped suite file; an empty list is an install error, never an
    empty answer."""
    folder = suites_dir()
    found = sorted(folder.glob("*.yaml"))
    if not found:
        raise QBenchError(f"no suite files in {folder}: this qbench install is incomplete; reinstall it")
    return found


def suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise QBenchError(f"suite '{name_or_path}' is a folder: give a suite file (.yaml)")
    known = shipped_suites()
    for builtin in known:
        if builtin.stem == name_or_path:
            return builtin
    raise QBenchError(
        f"suite '{name_or_path}' not found: give a suite file path or one of: {', '.join(p.stem for p in known)}"
    )


def load_suite(name_or_path: str, allow_outside_data: bool = False) -> Suite:
    """A suite file, validated: schema, and every data file present, text,
    and (unless ``allow_outside_data``) inside the suite's folder."""
    path = suite_path(name_or_path)
    raw = load_yaml(read_text(path), path)
    if not isinstance(raw, dict):
        raise QBenchError(f"{path}: a suite file must be a YAML mapping with at least 'name'")
    try:
        suite = Suite(**raw, root=str(path.parent.resolve()), file=str(path), allow_outside_data=allow_outside_data)
    except ValidationError as exc:
        raise QBenchError(f"{path}: {describe_validation(exc)}") from None
    missing = [str(p) for p in suite.data_files() if not p.is_file()]
    if missing:
        raise QBenchError(f"{path}: data file not found: {missing[0]}")
    return suite
