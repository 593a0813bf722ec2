"""The backend contract: what a quantization backend must provide.

Backends only turn token ids into logits and generated tokens. Tokenization,
windows, log-softmax, metrics and timing all live in the harness, so two table
rows can differ only because the quantization differs.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from qbench.core.cells import parse_variant, variant_text
from qbench.core.errors import QBenchError, describe_validation

if TYPE_CHECKING:  # torch is imported where tensors are made: a command that reads results stays quick
    import torch


class VariantConfig(BaseModel):
    """Settings of one variant. Backends subclass it with their own fields.

    ``extra="forbid"``: a misspelled setting is an error, not silently ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: How the latency workload decodes: ``eager`` (one Python step per
    #: token), or ``compiled`` (static KV cache and a torch.compile'd decode
    #: step replayed as a CUDA graph, as torchao's and gpt-fast's benchmarks
    #: measure). Quality phases always run eager, so a runtime changes timing,
    #: never a quality figure. Common to every backend; one that cannot
    #: compile fails the cell with the reason.
    runtime: Literal["eager", "compiled"] = "eager"
    #: ``torch.compile``'s mode for ``runtime=compiled``: ``max-autotune``
    #: (torchao's benchmarks) benchmarks kernel choices per matmul shape,
    #: ``reduce-overhead`` (gpt-fast's) keeps inductor's default kernels.
    #: Both tune inductor's own kernels by coordinate descent, as both
    #: benchmarks do, and the whole decode step replays as one CUDA graph.
    compile_mode: Literal["max-autotune", "reduce-overhead"] = "max-autotune"
    #: Which of the suite's calibration sets a calibrating variant uses:
    #: ``default`` (the suite's ``calibration``) or a name from its
    #: ``calibration_sets``. The samples' hash joins the artifact cache key,
    #: so the name itself stays out of it.
    calibration: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    #: How the KV cache stores keys and values: ``full`` (the dtype the
    #: model computes in; llama.cpp's f16) or one of the quantized types the
    #: backend lists in ``Backend.kv_caches``. Common to every backend; it
    #: changes the session, never the weights, so it stays out of the
    #: artifact's cache key. Quality is scored through the quantized cache
    #: (each session documents how), against a baseline with a full cache.
    kv_cache: str = Field("full", pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")

    @model_validator(mode="after")
    def _compile_mode_needs_compiled(self):
        if self.compile_mode != "max-autotune" and self.runtime != "compiled":
            raise ValueError("compile_mode applies to runtime=compiled only")
        return self

    def mix_key(self) -> Optional[Hashable]:
        """Whether this variant can be mixed with others of its backend in a
        mixed-precision recipe (``backend:recipe=PATH``, which the config
        then accepts): None where it cannot (the default); else variants with
        equal keys can share one model (e.g. one compute dtype and device).
        ``qbench search`` builds recipes from the backends that can."""
        return None

    def nominal_bits(self) -> Optional[float]:
        """Bits per weight this variant promises for its quantized layers.

        The harness uses it to refuse a row whose weights did not shrink. None
        means "full precision, nothing to verify"."""
        return None

    #: Settings that only change how an artifact is loaded (a kernel, an
    #: activation dtype), not its bytes: left out of the artifact cache key.
    load_only: ClassVar[tuple[str, ...]] = ()

    def settings(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def cache_settings(self) -> dict[str, Any]:
        # How it decodes never changes the bytes; the calibration samples' own hash is in the key.
        skip = set(self.load_only) | {"runtime", "compile_mode", "calibration", "kv_cache"}
        return {k: v for k, v in self.settings().items() if k not in skip}


def _split_patterns(value: Any) -> Any:
    if isinstance(value, str):
        return () if value.strip().lower() in ("", "none") else tuple(p.strip() for p in value.split("+"))
    return value


#: Module name patterns (fnmatch) for a setting like ``keep=lm_head+*.down_proj``;
#: '+' separates them because ',' separates settings on the command line.
ModulePatterns = Annotated[tuple[str, ...], BeforeValidator(_split_patterns)]


class Availability(BaseModel):
    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> Availability:
        return cls(ok=True)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(ok=False, reason=reason)


class Artifact(BaseModel):
    """A quantized model on disk, as ``Backend.quantize`` left it.

    ``path`` is the folder the backend wrote (or, for backends that need no
    new files, the source model folder). ``meta`` is free-form information the
    backend wants recorded (kernel, library settings, ...)."""

    backend: str
    variant: str
    config: dict[str, Any]
    path: str
    model_path: str
    meta: dict[str, Any] = {}
    quantize_seconds: float = 0.0
    #: the user's --trust-remote-code, for backends that load with transformers
    trust_remote_code: bool = False
    #: every file the backend wrote: relative path -> (size, sha256), checked
    #: before a cached entry is used
    files: dict[str, tuple[int, str]] = {}
    #: the cache key the entry was written under, and what it was computed
    #: from (qbench.cell.artifacts.artifact_identity), checked on every hit
    key: str = ""
    identity: dict[str, Any] = {}
    #: seconds the check of ``files`` took on this load (cache hits only)
    verify_seconds: Optional[float] = None
    #: GPUs the session spreads the model over (``--gpus-per-cell``; set for
    #: the load, never cached)
    gpus: int = 1

    def device_map(self, device: str) -> str:
        """transformers' ``device_map`` for the load: layers balanced over the
        worker's GPUs by accelerate when spread, else all on ``device``."""
        return "auto" if self.gpus > 1 else device


def ignore_step(finished_at: Optional[float] = None) -> None:
    """An ``on_token`` for generations that nobody times."""


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device's queue: a
    plain copy from pageable memory synchronises the stream first."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Session(abc.ABC):
    """A loaded model that the harness measures."""

    @abc.abstractmethod
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` for every position (any float dtype; the
        harness casts to float32 before log-softmax). Padding is on the right
        and marked by ``attention_mask``; a causal model may ignore the mask,
        since no real position attends to right padding, and the logits at
        padded positions are never read."""

    @abc.abstractmethod
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        on_token: Callable[..., None],
    ) -> torch.Tensor:
        """Greedy decode exactly ``max_new_tokens`` tokens (EOS never stops it).

        ``on_token()`` is called once per generated step, after the step's
        tokens are computed on the device (synchronise before calling it on
        asynchronous devices), so the harness can time prefill and decode.
        A session that queues steps ahead instead of waiting for each (the
        compiled runtime) calls ``on_token(finished_at)`` with each step's
        completion time measured on the device and expressed on the
        ``time.perf_counter`` clock; it may make those calls after the last
        step. Returns the new token ids ``[B, max_new_tokens]``."""

    @abc.abstractmethod
    def weight_bytes(self) -> int:
        """Bytes of weights this session actually holds (quantized storage,
        scales and zero points included)."""

    def describe(self) -> dict[str, Any]:
        """Facts worth recording: kernels used, quantized module types, ...
        Two keys are read, not only recorded: ``notes`` (a list of caveats
        found at load, each put beside the row's figures) and ``storage``
        (why the weights held differ from the artifact's files, e.g. "the
        artifact stores the embeddings in float32; this row holds them in
        bfloat16"), which replaces the generic reason when the two sizes
        differ by more than 10 %."""
        return {}

    def kv_bytes_per_position(self) -> Optional[int]:
        """Bytes of KV cache one sequence holds per position (all layers, keys
        and values), for the roofline column; None when unknown."""
        return None

    def kv_measured_bytes_per_position(self) -> Optional[float]:
        """Bytes the quantized KV cache really held per position after the
        last scoring pass (scales and full-precision residual included), or
        None where the session does not measure it."""
        return None

    def unread_weight_bytes(self) -> int:
        """Bytes of ``weight_bytes`` a decode step does not read, for the
        roofline column: an input embedding table that is not also the
        output head (a step reads one row of it)."""
        return 0

    def use_kv_cache(self, kind: str) -> Optional[str]:
        """Store the KV cache as ``kind`` (a name of ``Backend.kv_caches``)
        from now on, for scoring and decoding alike (the harness sets it right
        after loading). Returns None when done, or why this session cannot."""
        if kind == "full":
            return None
        return f"{type(self).__name__} keeps its KV cache in full precision"

    def use_runtime(self, runtime: str, compile_mode: str = "max-autotune") -> Optional[str]:
        """Decode ``generate`` through ``runtime`` from now on (the harness
        switches just before the latency workload), compiling with
        ``compile_mode`` where the runtime compiles. Returns None when done,
        or why this session cannot (the cell then fails with that reason)."""
        if runtime == "eager":
            return None
        return f"{type(self).__name__} has no '{runtime}' runtime"

    def close(self) -> None:
        """Release resources; the worker process ends right after anyway."""


class Backend(abc.ABC):
    """A quantization method. Subclass it, register an instance from a plugin."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    config_class: ClassVar[type[VariantConfig]] = VariantConfig
    #: Distribution names that must be importable, with the pip spec to install.
    requires: ClassVar[dict[str, str]] = {}
    #: The optional extra of the qbench package that installs ``requires``
    #: (``pip install 'qbench[bnb]'``), for the hint when something is missing.
    extra: ClassVar[Optional[str]] = None
    #: Bump when the files ``quantize`` writes change layout: it is part of the
    #: artifact cache key, so old artifacts are rebuilt instead of misread.
    artifact_format: ClassVar[int] = 1
    #: Whether ``quantize`` consumes calibration token ids (for every variant;
    #: override ``needs_calibration`` to decide per variant).
    uses_calibration: ClassVar[bool] = False
    #: Whether ``load`` can spread a model over the GPUs its worker sees when
    #: ``artifact.gpus`` > 1 (``--gpus-per-cell``); the run refuses it otherwise.
    shards_across_gpus: ClassVar[bool] = False
    #: Whether ``quantize`` runs in a process of its own rather than in the
    #: cell's worker, which then loads the artifact from the cache: a
    #: quantization library may leave the process changed (gptqmodel's left
    #: a CPU decode 2x slower in the process that quantized). Off only for a
    #: backend whose ``quantize`` writes nothing (a dtype cast at load).
    builds_apart: ClassVar[bool] = True
    #: The KV cache storages its sessions can use (``kv_cache=NAME``), name ->
    #: what it is. ``full`` alone: the backend cannot quantize its cache.
    kv_caches: ClassVar[dict[str, str]] = {"full": "keys and values in the dtype the model computes in"}

    @abc.abstractmethod
    def variants(self) -> dict[str, VariantConfig]:
        """Named variants, in the order they should run."""

    #: Distributions whose versions make up ``version()``: ``("hqq", "torch")``
    #: gives "hqq 0.2.8; torch 2.14.1".
    versions_of: ClassVar[tuple[str, ...]] = ()

    def version(self) -> Optional[str]:
        """Version of the library doing the quantization (recorded and part of
        the artifact cache key)."""
        if not self.versions_of:
            return None
        from qbench.core.environment import package_version

        return "; ".join(f"{name} {package_version(name)}" for name in self.versions_of)

    def available(self, device: str) -> Availability:
        """Whether ``variants`` can run on ``device`` ("cpu" or "cuda")."""
        from qbench.core.environment import missing_packages

        missing = missing_packages(self.requires)
        if missing:
            install = f"'qbench[{self.extra}]'" if self.extra else " ".join(missing.values())
            return Availability.no("missing " + ", ".join(missing) + f": pip install {install}")
        return Availability.yes()

    def variant_available(self, config: VariantConfig, device: str) -> Availability:
        """Per-variant availability (e.g. a CUDA-only kernel). Defaults to the
        backend's."""
        return self.available(device)

    def cell_available(self, config: VariantConfig, device: str) -> Availability:
        """Whether a cell of this variant can run on ``device``: the variant's
        own answer, then its runtime's (the one rule the planner and the
        worker both apply)."""
        availability = self.variant_available(config, device)
        if availability.ok and config.runtime == "compiled" and device != "cuda":
            return Availability.no("runtime=compiled needs CUDA (its decode step replays as a CUDA graph)")
        return availability

    def default_skip_reason(self, config: VariantConfig, device: str) -> Optional[str]:
        """Why a variant that can run here is still left out of a run that
        names no variants (e.g. far too slow on this device), or None. Asking
        for it by name always runs it."""
        return None

    def cache_inputs(self, config: VariantConfig) -> Optional[str]:
        """A fingerprint of inputs besides the model, settings and calibration
        that the artifact depends on (e.g. a checkpoint read in place), or
        None. It joins the artifact cache key."""
        return None

    def check_inputs(self, config: VariantConfig, model_path: Path) -> None:
        """Check the inputs a variant reads besides the model (a prequantized
        file or checkpoint) when the run is planned, so that a wrong path
        fails before any cell runs; raise ``QBenchError`` with the fix. The
        default checks nothing."""

    def for_device(self, config: VariantConfig, device: str) -> VariantConfig:
        """The variant with the settings it leaves to the device filled in
        (e.g. the execution provider an exported graph targets), so the
        record and the artifact cache key hold the values used. Called in
        the cell's worker before anything else looks at the settings."""
        return config

    def compute_dtype(self, config: VariantConfig, device: str) -> Optional[str]:
        """The dtype (``fp32``, ``bf16``, ``fp16``) the variant's matmuls
        compute in on ``device``, as far as the plan can tell, or None where
        the library picks it inside or at load (llama.cpp, ONNX Runtime,
        gptqmodel's kernels). A run warns when a row's differs from the
        baseline's. The default reads a ``compute_dtype`` setting once
        ``for_device`` has filled it in."""
        from qbench.core.dtypes import DTYPES

        value = getattr(self.for_device(config, device), "compute_dtype", None)
        return value if value in DTYPES else None

    def with_suite(self, config: VariantConfig, suite: Any) -> VariantConfig:
        """The variant with the settings it leaves to the suite filled in
        (e.g. QAT's training steps from the suite's ``qat`` section), so the
        record and the artifact cache key hold the values used. Called once
        the suite is loaded, before calibration and quantization."""
        return config

    def needs_calibration(self, config: VariantConfig) -> bool:
        """Whether ``quantize`` needs the suite's calibration samples for this
        variant. Their hash then joins the artifact's cache key."""
        return self.uses_calibration

    def parse_variant(self, spec: str) -> tuple[str, VariantConfig]:
        """Turn ``"nf4"``, ``"bits=4,group_size=64"`` or a named variant with
        changed settings, ``"nf4:compute_dtype=bf16"``, into a config (the
        grammar: ``qbench.core.cells``). A custom spec starts from the
        defaults of ``config_class``."""
        name, settings = parse_variant(spec)
        return spec, self.config_for(name, settings, spec)

    def config_for(self, variant: Optional[str], settings: dict[str, str], spec: Optional[str] = None) -> VariantConfig:
        """The config of named ``variant`` (None: the defaults of
        ``config_class``) with ``settings`` changed, validated by the config's
        own model; ``spec`` is the text errors quote."""
        spec = spec if spec is not None else variant_text(variant, settings)
        named = self.variants()
        if variant is not None and variant not in named:
            if settings:
                raise QBenchError(
                    f"unknown variant '{variant}' for backend '{self.name}' in '{spec}': choose one "
                    f"of {', '.join(named)} (see `qbench backends`)"
                )
            raise QBenchError(
                f"unknown variant '{spec}' for backend '{self.name}': choose one of "
                f"{', '.join(named)} or give settings like 'key=value,...' (see `qbench backends`)"
            )
        if variant is not None and not settings:
            return named[variant]
        start = named[variant].settings() if variant is not None else {}
        try:
            config = self.config_class.model_validate({**start, **settings})
        except ValidationError as exc:
            raise QBenchError(
                f"invalid variant '{spec}' for backend '{self.name}': {describe_validation(exc)} "
                f"(see `qbench backends` for the settings)"
            ) from None
        if config.kv_cache not in self.kv_caches:
            offered = ", ".join(self.kv_caches) if len(self.kv_caches) > 1 else "full only: it cannot quantize it"
            raise QBenchError(
                f"backend '{self.name}' cannot store its KV cache as '{config.kv_cache}' (in '{spec}'): "
                f"its kv_cache choices are {offered}"
            )
        return config

    def layer_quantizer(
        self, model_path: str, config: VariantConfig, device: str, trust_remote_code: bool = False
    ) -> LayerQuantizer:
        """A full-precision model whose linear layers this backend quantizes
        in place, a few at a time, for ``qbench sensitivity``. Backends that
        cannot select single layers raise QBenchError saying why."""
        raise QBenchError(
            f"backend '{self.name}' cannot quantize one layer at a time, which `qbench sensitivity` "
            "needs: use a backend that can (torchao)"
        )

    @abc.abstractmethod
    def quantize(
        self,
        model_path: Path,
        config: VariantConfig,
        calibration: Optional[list[list[int]]],
        workdir: Path,
    ) -> dict[str, Any]:
        """Quantize the HF model in ``model_path`` into ``workdir`` (an empty
        folder the harness caches). Returns metadata to record. Backends that
        need no files may write nothing and load from the model folder."""

    @abc.abstractmethod
    def load(self, artifact: Artifact, device: str) -> Session:
        """Load a quantized artifact onto ``device`` and return a session."""


class LayerQuantizer(abc.ABC):
    """A loaded full-precision model (``model``, in the variant's compute
    dtype) and the means to quantize some of its linear layers in place and
    to put their full-precision weights back."""

    model: Any

    @abc.abstractmethod
    def layers(self) -> list[str]:
        """The linear layers the variant quantizes (its ``keep`` applied), in model order."""

    @abc.abstractmethod
    def quantize(self, names: list[str]) -> Any:
        """Quantize these layers in place; returns what ``restore`` needs."""

    @abc.abstractmethod
    def restore(self, saved: Any) -> None:
        """Put back the full-precision weights ``quantize`` replaced."""
