"""A toy qbench backend: round-to-nearest (RTN) weight quantization.

This file is the plugin of the README's "write a backend plugin" tutorial. It
is loaded with ``qbench run --plugins-dir examples/rtn_plugin`` (or packaged
with a ``[project.entry-points.qbench]`` entry) and is tested like a built-in.

Every ``nn.Linear`` except the output head is quantized per group of
``group_size`` input columns to ``bits`` bits (symmetric: scale only;
asymmetric: scale and zero point). Codes are stored as int8 (not bit-packed:
a toy), and each layer dequantizes its weight in ``forward``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field, model_validator

from qbench import hookimpl
from qbench.backend import Artifact, Backend, VariantConfig


class RTNConfig(VariantConfig):
    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(32, gt=0)
    symmetric: bool = True

    @model_validator(mode="after")
    def _power_of_two(self):
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two, got {self.group_size}")
        return self

    def nominal_bits(self) -> Optional[float]:
        return self.bits


def quantize_weight(weight, config: RTNConfig):
    """int8 codes, scales and zero points of a [out, in] weight, per group."""
    import torch

    out_features, in_features = weight.shape
    if in_features % config.group_size:
        raise ValueError(f"group_size {config.group_size} does not divide {in_features} input features")
    groups = weight.float().reshape(out_features, -1, config.group_size)
    if config.symmetric:
        qmax = 2 ** (config.bits - 1) - 1
        scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
        zero = torch.zeros_like(scale)
        codes = torch.clamp(torch.round(groups / scale), -qmax - 1, qmax)
    else:
        qmax = 2 ** config.bits - 1
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low).clamp_min(1e-8) / qmax
        zero = torch.round(-low / scale)
        codes = torch.clamp(torch.round(groups / scale) + zero, 0, qmax) - 2 ** (config.bits - 1)
        zero = zero - 2 ** (config.bits - 1)  # stored codes are shifted into int8 range
    return codes.to(torch.int8), scale[..., 0], zero[..., 0]


def make_linear(codes, scale, zero, bias):
    import torch

    class RTNLinear(torch.nn.Module):
        """Holds int8 codes; dequantizes on the fly (slow but honest)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

        def forward(self, x):
            out_features, groups, size = self.codes.shape
            w = (self.codes.float() - self.zero[..., None]) * self.scale[..., None]
            return torch.nn.functional.linear(x, w.reshape(out_features, groups * size).to(x.dtype), self.bias)

    return RTNLinear()


class RTN(Backend):
    name = "rtn"
    description = "Toy round-to-nearest weight quantization (the plugin tutorial's example)"
    config_class = RTNConfig

    def variants(self) -> dict[str, VariantConfig]:
        return {"w8g32": RTNConfig(bits=8), "w4g32": RTNConfig(bits=4), "w2g32": RTNConfig(bits=2)}

    def version(self) -> Optional[str]:
        return "1"

    def quantize(self, model_path: Path, config: RTNConfig, calibration, workdir: Path) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        tensors = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                codes, scale, zero = quantize_weight(module.weight.data, config)
                tensors[f"{name}.codes"], tensors[f"{name}.scale"], tensors[f"{name}.zero"] = codes, scale, zero
        save_file(tensors, str(workdir / "rtn.safetensors"))
        return {"quantized_layers": len(tensors) // 3}

    def load(self, artifact: Artifact, device: str):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        from qbench.hf import HFSession

        model = AutoModelForCausalLM.from_pretrained(artifact.model_path, dtype=torch.float32)
        tensors = load_file(str(Path(artifact.path) / "rtn.safetensors"))
        for name in {key.rsplit(".", 1)[0] for key in tensors}:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            setattr(parent, child, make_linear(tensors[f"{name}.codes"], tensors[f"{name}.scale"],
                                               tensors[f"{name}.zero"], old.bias))
        return HFSession(model.to(device), device, {"kernel": "dequantize-then-matmul (torch)"})


@hookimpl
def register_backends(register):
    register(RTN())
