"""The legacy ``torch.ao`` dynamic int8 path, used by the torchao backend's
``kernel=legacy`` variants.

``torch.ao.quantization.quantize_dynamic`` is deprecated in favour of torchao
but its fbgemm kernels are still the fastest PyTorch path on x86 CPUs, which
is what users ask about. Its packed weights are opaque script objects, so the
artifact stores int8 codes, scales and zero points as plain safetensors and
rebuilds the quantized layers from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qbench.sdk import HFSession, QBenchError, replace_module, unique_state_dict, unique_tensor_bytes

DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


def quantize_legacy(model, layers: dict, config, weights: Path, layout: Path) -> dict[str, Any]:
    per_channel = config.granularity == "channel"
    # Full-precision tensors under their own names, quantized layers under
    # "q:<layer>.<part>": the artifact holds everything the session holds.
    tensors = {key: value for key, value in unique_state_dict(model).items() if key.rpartition(".")[0] not in layers}
    shapes = {}
    for name, layer in layers.items():
        w = layer.weight.detach().float()
        if per_channel:
            scale = (w.abs().amax(dim=1).clamp_min(1e-8) / 127.0).double()
            qweight = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        else:
            qweight = torch.quantize_per_tensor(w, float(w.abs().max().clamp_min(1e-8)) / 127.0, 0, torch.qint8)
        tensors.update(_flatten(name, qweight, layer.bias))
        shapes[name] = [layer.in_features, layer.out_features]
    save_file(tensors, str(weights), metadata={"format": "qbench-torch.ao-dynamic-int8"})
    layout.write_text(json.dumps({"layers": list(layers), "shapes": shapes}))
    return {
        "quantized_layers": len(layers),
        "granularity": config.granularity,
        "kernel": "torch.ao quantize_dynamic (fbgemm), deprecated upstream",
        "notes": ["torch.ao dynamic quantization is deprecated upstream in favour of torchao"],
    }


def _flatten(name: str, qweight: torch.Tensor, bias) -> dict[str, torch.Tensor]:
    out = {f"q:{name}.codes": qweight.int_repr().contiguous()}
    if qweight.qscheme() == torch.per_channel_affine:
        out[f"q:{name}.scales"] = qweight.q_per_channel_scales().contiguous()
    else:
        out[f"q:{name}.scales"] = torch.tensor([qweight.q_scale()], dtype=torch.float64)
    if bias is not None:
        out[f"q:{name}.bias"] = bias.detach().float().contiguous()
    return out


def load_legacy(model, weights: Path) -> None:
    """Replace each stored layer with a ``torch.ao`` dynamic int8 Linear."""
    with safe_open(str(weights), framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != "qbench-torch.ao-dynamic-int8":
            raise QBenchError(f"corrupt legacy artifact {weights}: delete {weights.parent} and run again")
    tensors = load_file(str(weights))
    rest = {key: value for key, value in tensors.items() if not key.startswith("q:")}
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    for name in sorted({key[2:].rsplit(".", 1)[0] for key in tensors if key.startswith("q:")}):
        codes, scales = tensors[f"q:{name}.codes"], tensors[f"q:{name}.scales"]
        if scales.numel() == 1:
            qweight = torch._make_per_tensor_quantized_tensor(codes, float(scales), 0)
        else:
            qweight = torch._make_per_channel_quantized_tensor(
                codes, scales, torch.zeros_like(scales, dtype=torch.long), 0
            )
        layer = DynamicLinear(codes.shape[1], codes.shape[0], bias_=f"q:{name}.bias" in tensors, dtype=torch.qint8)
        layer.set_weight_bias(qweight, tensors.get(f"q:{name}.bias"))
        replace_module(model, name, layer)


def is_legacy_quantized(module) -> bool:
    return isinstance(module, DynamicLinear)


class LegacySession(HFSession):
    """fbgemm's packed weights are script objects, invisible to the tensor
    walk: count the int8 codes and float scales they were packed from (the
    packed layout is about the same size, plus padding we cannot see)."""

    def weight_bytes(self) -> int:
        total = unique_tensor_bytes(self.model)
        for module in self.model.modules():
            if isinstance(module, DynamicLinear):
                weight, bias = module._weight_bias()
                scales = weight.q_per_channel_scales().numel() if weight.qscheme() == torch.per_channel_affine else 1
                total += weight.numel() + scales * 8 + (bias.numel() * 4 if bias is not None else 0)
        return total
