"""HQQ (Half-Quadratic Quantization, the ``hqq`` package): calibration-free
weight quantization, 1 to 8 bits in groups, its zero points and scales found
by a half-quadratic solver on the weights alone.

Each linear layer (``keep`` aside) becomes an ``HQQLinear``. The artifact is
the model's whole state dict in safetensors: HQQLinear encodes its settings
as tensors for exactly that, so nothing is unpickled at load. At load the
model is built from its config, the same layers are swapped for empty
HQQLinear shells, and the state dict fills them (checked strictly).

transformers 5.24's own ``HqqConfig`` integration raises "not available yet",
hence the direct use of hqq's layer. The kernel is hqq's PyTorch backend,
which dequantizes a layer's weights on every call: the portable path, on the
CPU and CUDA alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import Field, model_validator

from qbench.sdk import (
    HF_KV_CACHES,
    Artifact,
    Backend,
    ComputeDtype,
    HFSession,
    ModulePatterns,
    VariantConfig,
    device_dtype,
    hookimpl,
    torch_dtype,
)

WEIGHTS_FILE = "hqq_model.safetensors"


class HQQConfig(VariantConfig):
    bits: int = Field(4, description="weight bit width: 1, 2, 3, 4 or 8")
    group_size: int = Field(64, description="weights per scale and zero point (a power of two, 8 or more)")
    axis: int = Field(
        1, ge=0, le=1, description="grouping axis: 1 along the inputs (hqq's advice for quality), 0 along the outputs"
    )
    compute_dtype: ComputeDtype = Field(
        "auto", description="dtype the dequantized weights compute in (auto: fp32 on the CPU, bf16 on CUDA)"
    )
    keep: ModulePatterns = Field(("lm_head",), description="layers left in full precision ('+'-separated)")

    @model_validator(mode="after")
    def _widths(self):
        if self.bits not in (1, 2, 3, 4, 8):
            raise ValueError(f"bits must be 1, 2, 3, 4 or 8 (got {self.bits})")
        if self.group_size < 8 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two, 8 or more (got {self.group_size})")
        return self

    def nominal_bits(self) -> Optional[float]:
        return self.bits

    def hqq_config(self) -> dict[str, Any]:
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size, axis=self.axis)


class HQQSession(HFSession):
    """HQQLinear keeps its scales and zero points in a plain ``meta`` dict,
    not as parameters or buffers: they are counted here, or the row would
    under-report its weights."""

    def weight_bytes(self) -> int:
        return super().weight_bytes() + sum(_meta_bytes(m.meta) for m in self.model.modules() if _is_hqq(m))


def _meta_bytes(meta: dict[str, Any]) -> int:
    return sum(
        v.numel() * v.element_size() if isinstance(v, torch.Tensor) else _meta_bytes(v) if isinstance(v, dict) else 0
        for v in meta.values()
    )


def _is_hqq(module) -> bool:
    from hqq.core.quantize import HQQLinear

    return isinstance(module, HQQLinear)


def _swap(model: torch.nn.Module, names: list[str], make) -> None:
    from qbench.sdk import replace_module

    for name in names:
        replace_module(model, name, make(model.get_submodule(name)))


class HQQ(Backend):
    name = "hqq"
    kv_caches = HF_KV_CACHES  # its sessions are transformers models
    description = "HQQ: calibration-free 1-8 bit grouped weights (half-quadratic solver), hqq's PyTorch kernel"
    config_class = HQQConfig
    requires = {"hqq": "hqq"}
    extra = "hqq"
    versions_of = ("hqq", "torch")

    def for_device(self, config: HQQConfig, device: str) -> HQQConfig:
        return config.model_copy(update={"compute_dtype": device_dtype(config.compute_dtype, device)})

    def variants(self) -> dict[str, VariantConfig]:
        return {
            "w8g64": HQQConfig(bits=8),
            "w4g64": HQQConfig(bits=4),
            "w3g64": HQQConfig(bits=3),
            "w2g32": HQQConfig(bits=2, group_size=32),
        }

    def default_skip_reason(self, config: HQQConfig, device: str) -> Optional[str]:
        if device == "cpu" and config.bits != 4:
            return (
                "hqq dequantizes every layer on every call (a 4-bit cell takes about 5 minutes on a 2-core "
                "CPU): one row by default on the CPU"
            )
        return None

    def quantize(self, model_path: Path, config: HQQConfig, calibration, workdir: Path) -> dict[str, Any]:
        from hqq.core.quantize import HQQLinear
        from safetensors.torch import save_model

        from qbench.sdk import QBenchError, linear_layers, load_causal_lm

        dtype = torch_dtype(config.compute_dtype)
        model = load_causal_lm(str(model_path), dtype=dtype)
        chosen = list(linear_layers(model, config.keep))
        if not chosen:
            raise QBenchError(f"no linear layers left to quantize with keep={'+'.join(config.keep)}")
        odd = [n for n in chosen if model.get_submodule(n).weight.numel() % config.group_size]
        if odd:
            raise QBenchError(
                f"hqq: group_size={config.group_size} does not divide the weights of {odd[0]}: "
                "choose a smaller power of two"
            )
        _swap(
            model,
            chosen,
            lambda layer: HQQLinear(layer, config.hqq_config(), compute_dtype=dtype, device="cpu", del_orig=True),
        )
        save_model(model, str(workdir / WEIGHTS_FILE))  # tied embeddings stored once
        model.config.save_pretrained(str(workdir))
        return {"quantized_layers": len(chosen), "kept_full_precision": sorted(set(linear_layers(model, ())))}

    def load(self, artifact: Artifact, device: str):
        from hqq.core.quantize import HQQLinear
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModelForCausalLM

        from qbench.sdk import linear_layers, require_quantized_layers

        config = HQQConfig(**artifact.config)
        dtype = torch_dtype(config.compute_dtype)
        skeleton = AutoConfig.from_pretrained(artifact.path, trust_remote_code=artifact.trust_remote_code)
        model = AutoModelForCausalLM.from_config(skeleton, dtype=dtype, trust_remote_code=artifact.trust_remote_code)
        chosen = list(linear_layers(model, config.keep))
        _swap(
            model,
            chosen,
            lambda _: HQQLinear(None, config.hqq_config(), compute_dtype=dtype, device=device, initialize=False),
        )
        load_model(model, str(Path(artifact.path) / WEIGHTS_FILE), strict=True, device=device)
        model = model.to(device).eval()
        require_quantized_layers(model, chosen, _is_hqq, "hqq")
        facts = {"kernel": "hqq PyTorch backend (dequantize + matmul per call)", "compute_dtype": str(dtype)}
        return HQQSession(model, device, facts)


@hookimpl
def register_backends(register):
    register(HQQ())
