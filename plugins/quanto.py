"""optimum-quanto, Hugging Face's quantization toolkit: int8, int4 and int2
weights (int4/int2 in groups of 128), float8 weights, and int8 activations
with static scales calibrated on the suite's calibration samples.

The artifact is the quantized state dict in safetensors plus quanto's
quantization map (JSON). At load the model is built from the source folder,
the same layers are quantized, and the state dict replaces their weights and
scales; the keys it leaves unmatched are checked, not ignored.

Activation calibration runs with ``streamline=False``: quanto's default
streamlining switches off output quantization of some layers in memory, a
state its state dict does not carry, so a reloaded model would differ from
the calibrated one (max |Δlogit| 1.6 seen on the tiny test model; identical
without streamlining).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from qbench.sdk import (
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

WEIGHTS_FILE = "quanto_model.safetensors"
MAP_FILE = "quanto_qmap.json"
WEIGHT_BITS = {"int8": 8, "int4": 4, "int2": 2, "float8": 8}


class QuantoConfig(VariantConfig):
    weights: Literal["int8", "int4", "int2", "float8"] = Field("int8", description="weight type")
    activations: Literal["none", "int8"] = Field(
        "none", description="activation type (int8: static scales calibrated on the suite's samples)"
    )
    compute_dtype: ComputeDtype = Field(
        "auto", description="dtype the model computes in (auto: fp32 on the CPU, bf16 on CUDA)"
    )
    keep: ModulePatterns = Field(("lm_head",), description="layers left in full precision ('+'-separated)")

    def nominal_bits(self) -> Optional[float]:
        return WEIGHT_BITS[self.weights]


def _qtype(name: str):
    from optimum import quanto

    return None if name == "none" else getattr(quanto, f"q{name}")


def _is_quanto(module) -> bool:
    from optimum.quanto.nn import QModuleMixin

    return isinstance(module, QModuleMixin) and module.weight_qtype is not None


def _outside_inference_mode(module) -> None:
    """quanto's packed int4/int2 weights take a view of themselves in every
    matmul, which torch refuses under ``torch.inference_mode`` ("Cannot set
    version_counter for inference tensor"), the mode qbench scores in: the
    layer runs under ``no_grad`` instead, which records nothing either."""
    import functools

    import torch

    forward = module.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return forward(*args, **kwargs)

    module.forward = run


def _quantize_layers(model, config: QuantoConfig) -> list[str]:
    """Turn the chosen linear layers into quanto's modules (weights still in float until frozen or loaded)."""
    from optimum.quanto import quantize

    from qbench.sdk import QBenchError, linear_layers

    chosen = list(linear_layers(model, config.keep))
    if not chosen:
        raise QBenchError(f"no linear layers left to quantize with keep={'+'.join(config.keep)}")
    quantize(model, weights=_qtype(config.weights), activations=_qtype(config.activations), include=chosen)
    return chosen


class Quanto(Backend):
    name = "quanto"
    kv_caches = HF_KV_CACHES  # its sessions are transformers models
    description = "optimum-quanto: int8/int4/int2/float8 weights, optional int8 activations (static scales)"
    config_class = QuantoConfig
    requires = {"optimum.quanto": "optimum-quanto"}
    extra = "quanto"
    versions_of = ("optimum-quanto", "torch")

    def for_device(self, config: QuantoConfig, device: str) -> QuantoConfig:
        return config.model_copy(update={"compute_dtype": device_dtype(config.compute_dtype, device)})

    def variants(self) -> dict[str, VariantConfig]:
        return {
            "w8": QuantoConfig(weights="int8"),
            "w4": QuantoConfig(weights="int4"),
            "w2": QuantoConfig(weights="int2"),
            "f8": QuantoConfig(weights="float8"),
            "w8a8": QuantoConfig(weights="int8", activations="int8"),
        }

    def needs_calibration(self, config: QuantoConfig) -> bool:
        return config.activations != "none"

    def default_skip_reason(self, config: QuantoConfig, device: str) -> Optional[str]:
        if device == "cpu" and (config.weights, config.activations) not in (("int4", "none"), ("int8", "int8")):
            return "run by name on the CPU, to keep the default run short"
        return None

    def quantize(self, model_path: Path, config: QuantoConfig, calibration, workdir: Path) -> dict[str, Any]:
        import torch
        from optimum.quanto import Calibration, freeze, quantization_map
        from safetensors.torch import save_model

        from qbench.sdk import QBenchError, load_causal_lm

        model = load_causal_lm(str(model_path), dtype=torch_dtype(config.compute_dtype)).eval()
        chosen = _quantize_layers(model, config)
        meta: dict[str, Any] = {"quantized_layers": len(chosen)}
        if config.activations != "none":
            if not calibration:
                raise QBenchError(
                    "quanto's int8 activations need calibration samples: add a calibration section to the suite"
                )
            with torch.no_grad(), Calibration(streamline=False):
                for row in calibration:
                    model(torch.tensor([row]))
            meta.update(calibration_rows=len(calibration), calibration_tokens=sum(len(r) for r in calibration))
        freeze(model)
        save_model(model, str(workdir / WEIGHTS_FILE))  # tied embeddings stored once
        (workdir / MAP_FILE).write_text(json.dumps(quantization_map(model), indent=1))
        return meta

    def load(self, artifact: Artifact, device: str):
        from safetensors.torch import load_file

        from qbench.sdk import HFSession, QBenchError, load_causal_lm, require_quantized_layers

        config = QuantoConfig(**artifact.config)
        model = load_causal_lm(
            artifact.model_path, dtype=torch_dtype(config.compute_dtype), trust_remote_code=artifact.trust_remote_code
        )
        chosen = _quantize_layers(model, config)
        saved = json.loads((Path(artifact.path) / MAP_FILE).read_text())
        fix = f"delete {Path(artifact.path).parent} and run again to re-quantize"
        if sorted(saved) != sorted(chosen):
            raise QBenchError(
                f"quanto artifact {artifact.path} quantized other layers than this variant selects: {fix}"
            )
        state = load_file(str(Path(artifact.path) / WEIGHTS_FILE))
        # safetensors stores a tied tensor once, under one of its names: a
        # missing key is fine only if a name sharing its storage was loaded.
        shared: dict[int, set[str]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            shared.setdefault(tensor.untyped_storage().data_ptr(), set()).add(name)
        result = model.load_state_dict(state, strict=False)
        missing = [
            k for k in result.missing_keys if not any(k in names and names & state.keys() for names in shared.values())
        ]
        if result.unexpected_keys or missing:
            first = (result.unexpected_keys or missing)[0]
            raise QBenchError(f"quanto artifact {artifact.path} does not match the model (first key: {first}): {fix}")
        model.tie_weights()
        model = model.to(device).eval()
        require_quantized_layers(model, chosen, _is_quanto, "quanto")
        if config.weights in ("int4", "int2"):
            for name in chosen:
                _outside_inference_mode(model.get_submodule(name))
        kind = "int8 x int8 matmul" if config.activations == "int8" else "weight-only"
        return HFSession(
            model,
            device,
            {
                "kernel": f"optimum-quanto {config.weights} {kind}",
                "compute_dtype": str(torch_dtype(config.compute_dtype)),
            },
        )


@hookimpl
def register_backends(register):
    register(Quanto())
