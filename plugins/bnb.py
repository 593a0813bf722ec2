"""bitsandbytes through transformers' ``BitsAndBytesConfig``: LLM.int8 (with
its outlier threshold) and 4-bit NF4 / FP4, optionally double-quantized.

The artifact is transformers' own save of the quantized model (safetensors).
It is written before the model ever runs a forward pass: on CPU,
bitsandbytes 0.50 repacks NF4 weights into a CPU layout at the first forward,
and a model saved after that reloads as garbage (KLD ~16 seen here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from qbench.sdk import (
    DTYPES,
    HF_KV_CACHES,
    Artifact,
    Backend,
    ComputeDtype,
    ModulePatterns,
    VariantConfig,
    device_dtype,
    hookimpl,
    torch_dtype,
)


class BnbConfig(VariantConfig):
    mode: Literal["int8", "nf4", "fp4"] = "nf4"
    threshold: float = Field(6.0, ge=0, description="LLM.int8 outlier threshold (mode=int8); 0 disables it")
    double_quant: bool = Field(False, description="quantize the 4-bit scales again (mode=nf4|fp4)")
    compute_dtype: ComputeDtype = Field(
        "auto",
        description="4-bit matmul dtype (auto: fp32 on the CPU, bf16 on CUDA; on a CPU with AVX512-BF16 "
        "bitsandbytes computes in bf16 whatever this says)",
    )
    keep: ModulePatterns = Field(("lm_head",), description="layers left in full precision ('+'-separated)")

    @model_validator(mode="after")
    def _combination(self):
        if self.mode == "int8" and (self.double_quant or self.compute_dtype not in ("auto", "fp32")):
            raise ValueError(
                "double_quant and compute_dtype apply to mode=nf4|fp4 only (LLM.int8 computes in fp16 internally)"
            )
        if self.mode != "int8" and self.threshold != 6.0:
            raise ValueError("threshold applies to mode=int8 only")
        return self

    def nominal_bits(self) -> Optional[float]:
        return 8 if self.mode == "int8" else 4

    def transformers_config(self, skip: list[str]):
        import torch
        from transformers import BitsAndBytesConfig

        if self.mode == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.threshold, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.mode,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, DTYPES[self.compute_dtype]),
            llm_int8_skip_modules=skip,
        )


def _is_bnb_quantized(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


class BitsAndBytes(Backend):
    name = "bnb"
    kv_caches = HF_KV_CACHES  # its sessions are transformers models
    description = "bitsandbytes via transformers: LLM.int8 and 4-bit NF4/FP4 (double quantization optional)"
    config_class = BnbConfig
    shards_across_gpus = True
    requires = {"bitsandbytes": "bitsandbytes"}
    extra = "bnb"
    versions_of = ("bitsandbytes", "transformers")

    def for_device(self, config: BnbConfig, device: str) -> BnbConfig:
        # LLM.int8 computes in fp16 inside bitsandbytes whatever is set: its setting stays fp32
        dtype = "fp32" if config.mode == "int8" else device_dtype(config.compute_dtype, device)
        return config.model_copy(update={"compute_dtype": dtype})

    def compute_dtype(self, config: BnbConfig, device: str) -> Optional[str]:
        if config.mode == "int8":
            return "fp16"
        if device == "cpu" and _cpu_flag("avx512_bf16"):  # the plan's view of _cpu_repacks_4bit
            return "bf16"
        return super().compute_dtype(config, device)

    def variants(self) -> dict[str, VariantConfig]:
        return {
            "int8": BnbConfig(mode="int8"),
            "nf4": BnbConfig(mode="nf4"),
            "fp4": BnbConfig(mode="fp4"),
            "nf4-dq": BnbConfig(mode="nf4", double_quant=True),
        }

    def default_skip_reason(self, config: BnbConfig, device: str) -> Optional[str]:
        if device == "cpu" and config.double_quant:
            return (
                "bitsandbytes' CPU path repacks 4-bit weights at the first forward pass and drops the "
                "double-quantized scales: same bytes as without (161.9 MiB both on the default model)"
            )
        return None

    def quantize(self, model_path: Path, config: BnbConfig, calibration, workdir: Path) -> dict[str, Any]:
        from qbench.sdk import QBenchError, load_causal_lm, planned_layers

        chosen, kept = planned_layers(str(model_path), config.keep)
        if not chosen:
            raise QBenchError(f"no linear layers left to quantize with keep={'+'.join(config.keep)}")
        model = load_causal_lm(str(model_path), quantization_config=config.transformers_config(kept), device_map="cpu")
        # Saved before any forward pass (see the module docstring).
        model.save_pretrained(str(workdir))
        return {"quantized_layers": len(chosen), "kept_full_precision": kept}

    def load(self, artifact: Artifact, device: str):
        from qbench.sdk import HFSession, linear_layers, load_causal_lm, require_quantized_layers

        config = BnbConfig(**artifact.config)
        model = load_causal_lm(
            artifact.path, device_map=artifact.device_map(device), trust_remote_code=artifact.trust_remote_code
        )
        # The layers bitsandbytes does not quantize (embeddings, norms, the kept
        # head, biases) compute in the row's dtype, as they would for a user who
        # quantizes a bf16 checkpoint on a GPU. transformers keeps a pre-quantized
        # checkpoint's float tensors in the dtype they were saved in (fp32, from
        # the CPU's quantization) whatever dtype is asked, and refuses .to(dtype)
        # on a bitsandbytes model: without this a CUDA row computed most of the
        # model in fp32 beside its bf16 4-bit matmuls.
        rest = torch_dtype(device_dtype("auto", device) if config.mode == "int8" else config.compute_dtype)
        cast, saved = _cast_unquantized(model, rest)
        # bitsandbytes' layers subclass nn.Linear: the same selection names them.
        chosen = list(linear_layers(model, config.keep))
        require_quantized_layers(model, chosen, _is_bnb_quantized, "bitsandbytes")
        repacks = device == "cpu" and config.mode != "int8" and _cpu_repacks_4bit()
        dtype = "fp16" if config.mode == "int8" else "bf16" if repacks else config.compute_dtype
        facts = {"kernel": _kernel(config, device), "compute_dtype": f"torch.{DTYPES[dtype]}"}
        if config.mode == "int8":
            _log_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
            facts["int8_inputs"] = "LLM.int8 casts float32 activations to float16 before quantizing them"
        if cast:
            facts["storage"] = (
                f"the artifact stores {cast / 1e6:.1f}M unquantized parameters (embeddings, norms, kept layers) "
                f"in {', '.join(sorted(saved))}; this row holds and computes them in {str(rest).removeprefix('torch.')}"
            )
        return HFSession(model.eval(), device, facts)


def _cast_unquantized(model, dtype) -> tuple[int, set[str]]:
    """Float parameters outside bitsandbytes' quantized weights to ``dtype``
    (buffers, such as the rotary frequencies, keep theirs). Returns how many
    values were cast, and the dtypes they were loaded in."""
    cast, saved = 0, set[str]()
    for module in model.modules():
        quantized = _is_bnb_quantized(module)
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype and (name == "bias" or not quantized):
                cast, saved = cast + param.numel(), saved | {str(param.dtype).removeprefix("torch.")}
                param.data = param.data.to(dtype)
    return cast, saved


def _log_once(logger_name: str, prefix: str) -> None:
    """bitsandbytes logs the same warning on every int8 matmul (megabytes of
    log per cell, and time): let the first through, drop the repeats."""
    import logging

    class Once(logging.Filter):
        seen = False

        def filter(self, record: logging.LogRecord) -> bool:
            if not record.getMessage().startswith(prefix):
                return True
            first, Once.seen = not Once.seen, True
            return first

    logging.getLogger(logger_name).addFilter(Once())


def _cpu_flag(flag: str) -> bool:
    """Whether Linux lists ``flag`` for this CPU. The plan asks this, not
    bitsandbytes: importing bitsandbytes tries to fetch a kernel from the hub
    (and warns on the terminal when it cannot)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and flag in line.split() for line in info)
    except OSError:
        return False


def _cpu_repacks_4bit() -> bool:
    """Whether bitsandbytes' CPU 4-bit path repacks the weights at the first
    eval forward pass and then runs every matmul through its bf16 kernel
    (activations and scales cast to bf16, whatever ``compute_dtype`` says):
    it does on a CPU with AVX512-BF16 (bitsandbytes 0.50's ``Linear4bit.forward``)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _kernel(config: BnbConfig, device: str) -> str:
    if device == "cuda":
        return f"bitsandbytes CUDA {config.mode}"
    if config.mode == "int8":
        return "bitsandbytes CPU int8 (LLM.int8 decomposition in torch)"
    if not _cpu_repacks_4bit():
        return "bitsandbytes CPU 4-bit (dequantize + matmul)"
    # The bf16 kernel is kernels-community's gemm when the `kernels` package
    # could fetch it from the hub when bitsandbytes was imported, else
    # bitsandbytes' own (kernels 0.19 refuses a repository whose publisher it
    # cannot verify, and bitsandbytes then logs a warning and uses its own).
    from bitsandbytes.backends.cpu import ops

    fetched = getattr(ops, "gemm_4bit_forward_kernel", None) is not None
    which = "kernels-community gemm" if fetched else "bitsandbytes' own kernel"
    return f"bitsandbytes CPU 4-bit, bf16 ({which})"


@hookimpl
def register_backends(register):
    register(BitsAndBytes())
