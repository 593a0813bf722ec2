"""Full precision through transformers: the baseline (fp32) and the plain
half-precision casts (bf16, fp16) that every quantization should beat."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from qbench.sdk import DTYPES, HF_KV_CACHES, Artifact, Availability, Backend, VariantConfig, hookimpl


class FPConfig(VariantConfig):
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def nominal_bits(self) -> Optional[float]:
        return None if self.dtype == "fp32" else 16


class FullPrecision(Backend):
    name = "fp"
    kv_caches = HF_KV_CACHES  # its sessions are transformers models
    description = "Unquantized weights via transformers (the baseline) and plain fp16/bf16 casts"
    config_class = FPConfig
    builds_apart = False  # its quantize writes nothing: no process to spare
    shards_across_gpus = True

    def variants(self) -> dict[str, VariantConfig]:
        return {name: FPConfig(dtype=name) for name in DTYPES}

    def version(self) -> Optional[str]:
        from qbench.sdk import package_version

        return package_version("transformers")

    def variant_available(self, config: FPConfig, device: str) -> Availability:
        if config.dtype == "bf16" and device == "cuda":
            import torch

            if not torch.cuda.is_bf16_supported():
                return Availability.no("this GPU has no bfloat16 support")
        return Availability.yes()

    def default_skip_reason(self, config: FPConfig, device: str) -> Optional[str]:
        if config.dtype == "fp16" and device == "cpu":
            return "fp16 matmuls are slow on most CPUs (prefill ~3x fp32's on this project's 2-core machine)"
        return None

    def compute_dtype(self, config: FPConfig, device: str) -> Optional[str]:
        return config.dtype

    def quantize(self, model_path: Path, config: FPConfig, calibration, workdir: Path) -> dict[str, Any]:
        # A dtype cast needs no files: load() casts the source weights.
        return {"note": "cast at load time; no quantized files"}

    def load(self, artifact: Artifact, device: str):
        import torch

        from qbench.sdk import HFSession, load_causal_lm

        dtype = getattr(torch, DTYPES[artifact.config["dtype"]])
        if artifact.gpus > 1:
            model = load_causal_lm(
                artifact.model_path, dtype, artifact.trust_remote_code, device_map=artifact.device_map(device)
            )
        else:
            model = load_causal_lm(artifact.model_path, dtype, artifact.trust_remote_code).to(device)
        return HFSession(model, device, {"dtype": str(dtype)})


@hookimpl
def register_backends(register):
    register(FullPrecision())
