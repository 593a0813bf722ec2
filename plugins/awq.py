"""AWQ (activation-aware weight quantization) through gptqmodel, the same
library the ``gptq`` backend uses: per-channel scales searched on the suite's
calibration set protect the weights that large activations multiply, then
the weights are rounded to 4-bit groups (GEMM layout). Existing AWQ
checkpoints run as they are (``awq:prequantized:path=...``).

gptqmodel packs AWQ layers only from bfloat16 or float16 weights, so the
model is quantized and run in bfloat16 on the CPU (float16 on CUDA): the
row's KLD includes that cast, as the report's notes say (compare with ``fp:bf16``).
At load gptqmodel picks the AWQ kernel for the device (on an AVX-512 CPU its
``TorchCpuAvx512AwqLinear``) and the record names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field, model_validator

from qbench.sdk import QBenchError, VariantConfig, hookimpl
from qbench_plugins.gptq import GPTQ, GPTQConfig


class AWQConfig(GPTQConfig):
    sym: bool = Field(False, description="symmetric; false (AWQ's usual) stores zero points")

    @model_validator(mode="after")
    def _awq_settings(self):
        defaults = type(self).model_fields
        fixed = [k for k in ("desc_act", "damp_percent", "kernel") if getattr(self, k) != defaults[k].default]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} do not apply to AWQ (gptqmodel picks the AWQ kernel for the device)")
        if self.bits != 4:
            raise ValueError("AWQ checkpoints are 4-bit here (gptqmodel's AWQ kernels)")
        return self


class AWQ(GPTQ):
    name = "awq"
    description = "AWQ via gptqmodel: activation-aware 4-bit groups from the calibration set, or an AWQ checkpoint"
    config_class = AWQConfig
    method = "awq"
    quantize_dtype = "bfloat16"

    def variants(self) -> dict[str, VariantConfig]:
        return {"w4g128": AWQConfig(), "w4g64": AWQConfig(group_size=64), "prequantized": AWQConfig(path="")}

    def default_skip_reason(self, config: AWQConfig, device: str) -> Optional[str]:
        if device == "cpu" and config.path is None and config.group_size != 64:
            return "one AWQ row per default CPU run (group 64 divides more models' widths, SmolLM2's 576 among them)"
        return None

    def quantize(self, model_path: Path, config: AWQConfig, calibration, workdir: Path) -> dict[str, Any]:
        if config.path is None and config.group_size != -1:
            from qbench.sdk import linear_layers, meta_skeleton

            for name, layer in linear_layers(meta_skeleton(str(model_path)), config.keep).items():
                if layer.in_features % config.group_size:
                    raise QBenchError(
                        f"awq: group_size {config.group_size} does not divide the {layer.in_features} "
                        f"input features of {name} (gptqmodel's AWQ needs it to): use a group size "
                        "that does, e.g. awq:w4g64"
                    )
        return super().quantize(model_path, config, calibration, workdir)

    def quantize_config(self, config: AWQConfig):
        from gptqmodel.quantization.config import AWQConfig as GptqmodelAWQ

        return GptqmodelAWQ(bits=config.bits, group_size=config.group_size, sym=config.sym)

    def kernel_and_dtype(
        self, config: AWQConfig, bits: int, group: int, in_features: list[int], device: str
    ) -> tuple[str, str, Optional[str]]:
        # The report notes a dtype other than the baseline's (qbench.core.dtypes.cast_note).
        return "auto", "bfloat16" if device == "cpu" else "float16", None


@hookimpl
def register_backends(register):
    register(AWQ())
