"""Native PyTorch post-training quantization: torchao's ``quantize_`` API, and
the legacy ``torch.ao.quantization.quantize_dynamic`` path (deprecated upstream
in favour of torchao, kept because its fbgemm kernels are fast on x86 CPUs).

Every variant is a set of settings (bit width, symmetric or not, granularity,
activations none / dynamic / static, kernel, modules kept in full precision)
mapped onto one torchao config per layer. Quantized weights are stored with
torchao's safetensors support (an allowlist of tensor classes, no pickle); the
legacy path stores int8 codes and scales as plain safetensors.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from qbench.sdk import (
    HF_KV_CACHES,
    Artifact,
    Availability,
    Backend,
    ComputeDtype,
    LayerQuantizer,
    ModulePatterns,
    QBenchError,
    Recipe,
    VariantConfig,
    device_dtype,
    hookimpl,
    load_recipe,
    torch_dtype,
)

WEIGHTS_FILE = "quantized.safetensors"
LAYOUT_FILE = "layers.json"


class TorchAOConfig(VariantConfig):
    bits: int = Field(8, ge=1, le=8, description="weight bit width")
    granularity: str = Field("channel", description="tensor | channel | group:N (one scale per N inputs)")
    symmetric: bool = Field(True, description="false: asymmetric, with a zero point")
    activations: Literal["none", "dynamic", "static"] = Field(
        "none", description="weight-only, or int8 activations with dynamic or calibrated static scales"
    )
    dtype: Literal["int", "float8"] = "int"
    kernel: Literal["auto", "tinygemm", "gemlite", "legacy"] = Field(
        "auto",
        description="tinygemm: CUDA int4; gemlite: Triton GEMV/GEMM kernels for 4- and 8-bit weights "
        "(CUDA); legacy: torch.ao quantize_dynamic (fbgemm)",
    )
    compute_dtype: ComputeDtype = Field(
        "auto",
        description="activation dtype (auto: the kernel's own where it has one, fp16 for gemlite, bf16 for "
        "tinygemm and float8; else fp32 on the CPU, bf16 on CUDA)",
    )
    keep: ModulePatterns = Field(("lm_head",), description="layers left in full precision ('+'-separated)")
    recipe: Optional[Recipe] = Field(
        None,
        description="a mixed-precision recipe YAML (its base variant plus per-layer overrides); given as "
        "recipe=PATH with no other quantization setting",
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_base(cls, data: Any) -> Any:
        """``recipe=PATH``: the recipe's content replaces the path (so a
        record and the cache key carry the recipe itself, and a cached
        artifact never needs the file again), and its base variant's settings
        fill every other field."""
        if not isinstance(data, dict) or data.get("recipe") in (None, "", "none"):
            return data
        data = dict(data)
        data.pop("recipe_sha256", None)  # written by settings(); the content decides
        recipe = data["recipe"]
        recipe = load_recipe(recipe) if isinstance(recipe, (str, Path)) else Recipe.model_validate(recipe)
        if recipe.backend not in (None, "torchao"):
            raise ValueError(
                f"the recipe is for backend '{recipe.backend}', not torchao: run it with "
                f"-b {recipe.backend}:recipe=PATH"
            )
        base = _plain_variant(recipe.base, "its base")
        runtime = {key: data[key] for key in ("runtime", "compile_mode", "compute_dtype") if key in data}
        given = {
            key: value
            for key, value in data.items()
            if key not in ("recipe", "runtime", "compile_mode", "compute_dtype")
        }
        if given:
            merged = TorchAOConfig(**{**base.settings(), **given}).settings()
            changed = [key for key in given if merged.get(key) != base.settings().get(key)]
            if changed:
                raise ValueError(
                    f"the recipe's base ({recipe.base}) sets '{changed[0]}': give the recipe alone, "
                    "as torchao:recipe=PATH, and change its base in the file"
                )
        return {**base.settings(), **runtime, "recipe": recipe}

    @model_validator(mode="after")
    def _recipe_overrides(self):
        if self.recipe is None:
            return self
        if self.kernel == "legacy":
            raise ValueError("kernel=legacy rewrites the whole model and cannot be a recipe's base")
        for override in self.recipe.overrides:
            if override.use is None:
                continue
            other = _plain_variant(override.use, f"override {list(override.match)}")
            if other.activations == "static" or other.kernel == "legacy":
                raise ValueError(
                    f"override use: {override.use} cannot quantize single layers of a recipe "
                    "(static scales and the legacy kernel apply to the whole model)"
                )
            if compute_dtype(other) != compute_dtype(self) or other.needs_cuda != self.needs_cuda:
                raise ValueError(
                    f"override use: {override.use} computes in {compute_dtype(other)}, the base "
                    f"{self.recipe.base} in {compute_dtype(self)}: a recipe mixes variants of one "
                    "compute dtype and device"
                )
        return self

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        if self.recipe is not None:
            out["recipe_sha256"] = self.recipe.digest()
        return out

    def cache_settings(self) -> dict[str, Any]:
        # The recipe by its digest: its provenance ("source") does not change the bytes.
        out = super().cache_settings()
        out.pop("recipe", None)
        # The dtype each variant computed in before compute_dtype existed
        # keeps the key it had: such artifacts stay valid.
        if out.get("compute_dtype") in ("auto", _kernel_dtype(self, "cpu")):
            out.pop("compute_dtype")
        return out

    def mix_key(self) -> tuple[str, bool]:
        """Variants that can share one model in a recipe: same compute dtype, same device."""
        return str(compute_dtype(self)), self.needs_cuda

    def layer_variant(self, layer: str) -> Optional[TorchAOConfig]:
        """How one layer is quantized: this config (a recipe's base), an
        override's variant, or None where the recipe keeps it."""
        decided = self.recipe.decide(layer) if self.recipe is not None else None
        if decided is None:
            return self
        return None if decided.keep else _plain_variant(decided.use, f"override {list(decided.match)}")

    @model_validator(mode="after")
    def _combination(self):
        group = self.group_size
        if self.granularity not in ("tensor", "channel") and group is None:
            raise ValueError(f"granularity must be tensor, channel or group:N, got '{self.granularity}'")
        if group is not None and (group < 8 or group & (group - 1)):
            raise ValueError(f"granularity group size must be a power of two >= 8, got {group}")
        if self.dtype == "float8":
            if self.bits != 8 or group is not None or self.activations == "static" or self.kernel != "auto":
                raise ValueError(
                    "dtype=float8 needs bits=8, granularity tensor or channel, activations none or dynamic, kernel auto"
                )
        kernel_dtype = _kernel_dtype(self, "cuda")
        if self.compute_dtype not in ("auto", kernel_dtype) and self.needs_cuda:
            raise ValueError(
                f"kernel={self.kernel} dtype={self.dtype} computes in {kernel_dtype} only: leave "
                "compute_dtype out (auto)"
            )
        if self.kernel == "legacy" and self.compute_dtype not in ("auto", "fp32"):
            raise ValueError(
                "kernel=legacy (torch.ao quantize_dynamic) computes in fp32 only: leave compute_dtype out (auto)"
            )
        if self.kernel == "tinygemm" and (
            self.bits != 4 or group not in (32, 64, 128, 256) or self.activations != "none" or self.symmetric
        ):
            raise ValueError(
                "kernel=tinygemm needs bits=4, granularity group:32|64|128|256, "
                "activations=none and symmetric=false (it stores zero points)"
            )
        if self.kernel == "gemlite" and not (
            self.activations == "none"
            and self.dtype == "int"
            and (
                (self.bits == 4 and group in (32, 64, 128, 256, 512, 1024) and not self.symmetric)
                or (self.bits == 8 and self.granularity == "channel" and self.symmetric)
            )
        ):
            raise ValueError(
                "kernel=gemlite needs activations=none and either bits=4, granularity "
                "group:32..1024, symmetric=false, or bits=8, granularity=channel, symmetric=true"
            )
        if self.kernel == "legacy" and (
            self.bits != 8 or group is not None or self.activations != "dynamic" or not self.symmetric
        ):
            raise ValueError(
                "kernel=legacy (torch.ao quantize_dynamic) needs bits=8, activations=dynamic, "
                "symmetric=true and granularity tensor or channel"
            )
        if self.activations == "static" and (self.bits != 8 or group is not None):
            raise ValueError("activations=static needs bits=8 and granularity tensor or channel")
        if self.granularity == "tensor" and self.bits != 8:
            raise ValueError("granularity=tensor needs bits=8 (sub-byte weights need channel or group scales)")
        if self.activations == "dynamic" and self.granularity == "tensor" and not self._int8_fast_path:
            raise ValueError("activations=dynamic with granularity=tensor needs bits=8 and symmetric=true")
        return self

    @property
    def group_size(self) -> Optional[int]:
        match = re.fullmatch(r"group:(\d+)", self.granularity)
        return int(match.group(1)) if match else None

    @property
    def _int8_fast_path(self) -> bool:
        # torchao's Int8Tensor: symmetric int8, per-row or per-tensor scales.
        return self.dtype == "int" and self.bits == 8 and self.symmetric and self.group_size is None

    def nominal_bits(self) -> Optional[float]:
        return self.bits

    @property
    def needs_cuda(self) -> bool:
        return self.kernel in ("tinygemm", "gemlite") or self.dtype == "float8"


@functools.cache
def _plain_variant(spec: str, what: str) -> TorchAOConfig:
    """A named torchao variant or ``key=value`` settings, without a recipe of
    its own (refused before parsing, so a recipe naming itself cannot
    recurse). Cached: a recipe asks for its variants once per layer."""
    if "recipe" in spec:
        raise ValueError(f"{what} ('{spec}') names a recipe: a recipe's variants are plain ones")
    try:
        return TorchAO().parse_variant(spec)[1]
    except QBenchError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _granularity(config: TorchAOConfig, in_features: int):
    """torchao granularity for one layer, and a fallback note when the group
    size does not divide the layer's input features (e.g. 128 vs 576)."""
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow, PerTensor

    group = config.group_size
    if group is None:
        return (
            PerTensor() if config.granularity == "tensor" else PerRow() if config._int8_fast_path else PerAxis(0)
        ), None
    if in_features % group:
        return PerAxis(0), f"group size {group} does not divide {in_features} input features: per-channel scales"
    return PerGroup(group), None


def layer_config(config: TorchAOConfig, in_features: int, act_scale=None):
    """The torchao config for one linear layer, and a fallback note or None."""
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8StaticActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerAxis,
        PerRow,
        PerTensor,
    )

    # set_inductor_config=False everywhere: torchao's recommended inductor
    # settings are process-wide, and would apply to a compiled cell only
    # when it quantized (not on a cache hit); qbench's compiled runtime sets
    # the inductor configuration itself (qbench.sdk.hf.CompiledDecoder).
    granularity, note = _granularity(config, in_features)
    mapping = MappingType.SYMMETRIC if config.symmetric else MappingType.ASYMMETRIC
    weight_dtype = getattr(torch, f"int{config.bits}")
    if config.dtype == "float8":
        fp8 = PerTensor() if config.granularity == "tensor" else PerRow()
        if config.activations == "dynamic":
            return Float8DynamicActivationFloat8WeightConfig(granularity=fp8, set_inductor_config=False), None
        return Float8WeightOnlyConfig(set_inductor_config=False), None
    if config.kernel == "tinygemm":
        if in_features % 128 == 0 and note is None:
            return Int4WeightOnlyConfig(
                group_size=config.group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
            ), None
        note = note or f"tinygemm needs input features divisible by 128, not {in_features}: per-channel scales"
        return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=PerAxis(0), mapping_type=mapping), note
    if config.kernel == "gemlite":
        from torchao.prototype.quantization.quant_api import UIntxWeightOnlyConfig

        return UIntxWeightOnlyConfig(
            group_size=None if note else config.group_size, bit_width=config.bits, set_inductor_config=False
        ), note
    if config.activations == "static":
        return Int8StaticActivationInt8WeightConfig(
            act_quant_scale=act_scale, granularity=[PerTensor(), granularity], set_inductor_config=False
        ), None
    if config.activations == "dynamic":
        if config._int8_fast_path:
            return Int8DynamicActivationInt8WeightConfig(granularity=granularity, set_inductor_config=False), note
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight_dtype, weight_granularity=granularity, weight_mapping_type=mapping
        ), note
    if config._int8_fast_path:
        return Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False), note
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity, mapping_type=mapping), note


def calibrate_activation_scales(model, layers: dict, calibration: list[list[int]]) -> dict:
    """Per-tensor symmetric int8 scale of each layer's input: max |x| over the
    calibration samples / 127, shaped for torchao's static int8 activations."""
    import torch

    amax: dict[str, float] = {}

    def hook(name):
        def record(_module, inputs, _output):
            amax[name] = max(amax.get(name, 0.0), float(inputs[0].detach().abs().amax()))

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            for sample in calibration:
                model(input_ids=torch.tensor([sample], device=model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # Activations arrive as [batch, tokens, features]: torchao wants a scale of
    # the same rank.
    return {name: torch.tensor(max(value, 1e-8) / 127.0).reshape(1, 1, 1) for name, value in amax.items()}


def _kernel_dtype(config: TorchAOConfig, device: str) -> str:
    """What ``compute_dtype=auto`` means for this variant on ``device``:
    gemlite's kernels (as torchao 0.18 builds them) take float16
    activations, tinygemm and the float8 matmuls bfloat16, the legacy
    kernel float32; the others follow the device (torchao's int8 and intx
    weight-only paths compute in the activations' dtype)."""
    if config.kernel == "gemlite":
        return "fp16"
    if config.needs_cuda:
        return "bf16"
    if config.kernel == "legacy":
        return "fp32"
    return device_dtype("auto", device)


def compute_dtype(config: TorchAOConfig):
    """The torch dtype the variant computes in: its setting once
    ``for_device`` resolved it; ``auto`` (a config not yet placed) as on the
    device its kernel needs, the CPU for the others."""
    name = config.compute_dtype
    if name == "auto":
        name = _kernel_dtype(config, "cuda" if config.needs_cuda else "cpu")
    return torch_dtype(name)


class TorchAO(Backend):
    name = "torchao"
    kv_caches = HF_KV_CACHES  # its sessions are transformers models
    description = "Native PyTorch PTQ: torchao quantize_ (int8/intx/int4/float8) and legacy torch.ao dynamic int8"
    config_class = TorchAOConfig
    requires = {"torchao": "torchao"}
    extra = "torchao"
    versions_of = ("torchao", "torch")
    artifact_format = 2

    def variants(self) -> dict[str, VariantConfig]:
        return {
            "int8-dyn": TorchAOConfig(activations="dynamic"),
            "int8-wo": TorchAOConfig(),
            "int4-wo-g32": TorchAOConfig(bits=4, granularity="group:32"),
            "int4-wo-g128": TorchAOConfig(bits=4, granularity="group:128"),
            "int8-static": TorchAOConfig(activations="static"),
            "int8-dyn-legacy": TorchAOConfig(activations="dynamic", kernel="legacy"),
            "int4-tinygemm-g128": TorchAOConfig(bits=4, granularity="group:128", symmetric=False, kernel="tinygemm"),
            "int4-gemlite-g128": TorchAOConfig(bits=4, granularity="group:128", symmetric=False, kernel="gemlite"),
            "int8-gemlite": TorchAOConfig(kernel="gemlite"),
            "float8-wo": TorchAOConfig(dtype="float8"),
            "float8-dyn": TorchAOConfig(dtype="float8", activations="dynamic"),
        }

    def for_device(self, config: TorchAOConfig, device: str) -> TorchAOConfig:
        if config.compute_dtype != "auto":
            return config
        return config.model_copy(update={"compute_dtype": _kernel_dtype(config, device)})

    def check_inputs(self, config: TorchAOConfig, model_path: Path) -> None:
        """A recipe's overrides against the model's linear layers, from its
        structure alone (no weights read): one that matches nothing fails
        the plan (see Recipe.check_matches)."""
        if config.recipe is not None:
            from qbench.sdk import planned_layers

            config.recipe.check_matches(planned_layers(str(model_path), config.keep)[0])

    def needs_calibration(self, config: TorchAOConfig) -> bool:
        return config.activations == "static"

    def variant_available(self, config: TorchAOConfig, device: str) -> Availability:
        base = self.available(device)
        if config.kernel == "legacy" and device != "cpu":
            return Availability.no("torch.ao dynamic quantization runs on CPU only (fbgemm/qnnpack kernels)")
        if not base.ok or not config.needs_cuda:
            return base
        if device != "cuda":
            return Availability.no("needs CUDA (a CUDA-only kernel); run with --device cuda on a GPU machine")
        import torch

        if config.kernel == "gemlite" and importlib.util.find_spec("gemlite") is None:
            return Availability.no("needs gemlite 0.5 (Triton kernels): pip install 'qbench[gemlite]'")
        if config.dtype == "float8" and torch.cuda.get_device_capability() < (8, 9):
            return Availability.no("float8 matmuls need a GPU of compute capability 8.9 or newer (Ada, Hopper)")
        return Availability.yes()

    def quantize(self, model_path: Path, config: TorchAOConfig, calibration, workdir: Path) -> dict[str, Any]:
        from qbench.sdk import linear_layers, load_causal_lm

        device = "cuda" if config.needs_cuda else "cpu"
        model = load_causal_lm(str(model_path), compute_dtype(config)).to(device).eval()
        layers = linear_layers(model, config.keep)
        recipe_notes = config.recipe.check_matches(list(layers)) if config.recipe is not None else []
        variants = {name: config.layer_variant(name) for name in layers}
        layers = {name: layer for name, layer in layers.items() if variants[name] is not None}
        if not layers:
            raise QBenchError(
                f"no linear layers left to quantize with keep={'+'.join(config.keep)}"
                + (" and the recipe's overrides" if config.recipe is not None else "")
            )
        if config.kernel == "legacy":
            from qbench_plugins.torch_ao_legacy import quantize_legacy

            return quantize_legacy(model, layers, config, workdir / WEIGHTS_FILE, workdir / LAYOUT_FILE)

        from torchao.quantization import FqnToConfig, quantize_

        scales = calibrate_activation_scales(model, layers, calibration) if config.activations == "static" else {}
        per_layer, fallbacks = {}, {}
        for name, layer in layers.items():
            per_layer[name], note = layer_config(variants[name], layer.in_features, scales.get(name))
            if note:
                fallbacks[name] = note
        quantize_(model, FqnToConfig(per_layer), filter_fn=None)
        save_quantized_state(model, workdir / WEIGHTS_FILE)
        (workdir / LAYOUT_FILE).write_text(json.dumps({"layers": list(layers)}))
        meta: dict[str, Any] = {
            "quantized_layers": len(layers),
            "compute_dtype": str(compute_dtype(config)),
            "kept_full_precision": sorted(set(linear_layers(model, ())) - set(layers)),
            "torchao_config": type(next(iter(per_layer.values()))).__name__,
        }
        if calibration is not None:
            meta["calibration_samples"] = len(calibration)
        if config.recipe is not None:
            uses = [variants[name].settings() for name in layers if variants[name] is not config]
            meta["recipe"] = {
                "sha256": config.recipe.digest(),
                "base_layers": len(layers) - len(uses),
                "override_layers": len(uses),
                "kept_layers": sum(v is None for v in variants.values()),
            }
        notes = list(recipe_notes)
        if fallbacks:
            meta["granularity_fallback"] = {"layers": len(fallbacks), "example": next(iter(fallbacks.items()))}
            notes.append(
                f"{len(fallbacks)} of {len(layers)} layers use per-channel scales: {next(iter(fallbacks.values()))}"
            )
        if notes:
            meta["notes"] = notes
        return meta

    def layer_quantizer(
        self, model_path: str, config: TorchAOConfig, device: str, trust_remote_code: bool = False
    ) -> LayerQuantizer:
        if config.recipe is not None:
            raise QBenchError(
                "sensitivity quantizes with one uniform variant, not a recipe: name the recipe's "
                f"base ({config.recipe.base}) instead"
            )
        if config.activations == "static" or config.kernel == "legacy":
            raise QBenchError(
                f"torchao {'int8-static' if config.activations == 'static' else 'kernel=legacy'} "
                "cannot quantize one layer at a time (static scales are calibrated over the whole "
                "model; the legacy kernel rewrites it as a whole): choose another torchao variant"
            )
        return TorchAOLayers(model_path, config, device, trust_remote_code)

    def load(self, artifact: Artifact, device: str):
        from qbench.sdk import HFSession, load_causal_lm, require_quantized_layers

        config = TorchAOConfig(**artifact.config)
        model = load_causal_lm(artifact.model_path, compute_dtype(config), artifact.trust_remote_code)
        layers = json.loads((Path(artifact.path) / LAYOUT_FILE).read_text())["layers"]
        weights = Path(artifact.path) / WEIGHTS_FILE
        if config.kernel == "legacy":
            from qbench_plugins.torch_ao_legacy import LegacySession, is_legacy_quantized, load_legacy

            load_legacy(model, weights)
            require_quantized_layers(model, layers, is_legacy_quantized, "torchao legacy")
            return LegacySession(
                model.eval(),
                device,
                {"kernel": "torch.ao dynamic int8 (fbgemm; deprecated upstream in favour of torchao)"},
            )
        model = model.to(device)
        load_quantized_state(model, weights, device)
        require_quantized_layers(model, layers, _is_torchao_quantized, "torchao")
        weight = model.get_submodule(layers[0]).weight
        return HFSession(
            model.eval(),
            device,
            {"kernel": f"torchao {type(weight).__name__}", "compute_dtype": str(compute_dtype(config))},
        )


class TorchAOLayers(LayerQuantizer):
    """torchao's ``quantize_`` on named layers of a loaded model; restoring
    puts the original weight parameters back on their modules."""

    def __init__(self, model_path: str, config: TorchAOConfig, device: str, trust_remote_code: bool):
        from qbench.sdk import linear_layers, load_causal_lm

        self.config = config
        self.model = load_causal_lm(model_path, compute_dtype(config), trust_remote_code).to(device).eval()
        self._layers = linear_layers(self.model, config.keep)

    def layers(self) -> list[str]:
        return list(self._layers)

    def quantize(self, names: list[str]) -> dict[str, Any]:
        from torchao.quantization import FqnToConfig, quantize_

        saved = {name: self._layers[name].weight for name in names}
        quantize_(
            self.model,
            FqnToConfig({name: layer_config(self.config, self._layers[name].in_features)[0] for name in names}),
            filter_fn=None,
        )
        return saved

    def restore(self, saved: dict[str, Any]) -> None:
        for name, weight in saved.items():
            self._layers[name].weight = weight


def _is_torchao_quantized(module) -> bool:
    import torch

    weight = getattr(module, "weight", None)
    return (
        weight is not None
        and type(weight) not in (torch.Tensor, torch.nn.Parameter)
        and hasattr(weight, "__tensor_flatten__")
    )


def save_quantized_state(model, path: Path) -> None:
    """The whole model's tensors (tied ones once), quantized ones flattened
    by torchao into plain tensors plus JSON metadata, in one safetensors file:
    the artifact holds everything the session holds."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    from qbench.sdk import unique_state_dict

    state = unique_state_dict(model)
    packed = {key: state.pop(key) for key in [k for k, v in state.items() if type(v).__name__ == GEMLITE_CLASS]}
    tensors, metadata = flatten_tensor_state_dict(state)
    if packed:
        tensors, metadata = dict(tensors), dict(metadata or {})
        layout = {}
        for key, weight in packed.items():
            for name in ("qdata", "scale", "zero_point"):
                tensors[f"{key}{GEMLITE_SEP}{name}"] = getattr(weight, name)
            layout[key] = {
                "gemlite_kwargs": weight.gemlite_kwargs,
                "bit_width": weight.bit_width,
                "group_size": weight.group_size,
                "dtype": str(weight.dtype).removeprefix("torch."),
            }
        metadata[GEMLITE_METADATA] = json.dumps(layout)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


# torchao's safetensors support has no entry for gemlite's packed tensor
# (UIntxBitPackedTensor, a prototype): its three plain tensors are stored
# under "<key>::<name>" and its settings (ints and flags) as JSON metadata,
# so loading it runs no code from the file either.
GEMLITE_CLASS = "UIntxBitPackedTensor"
GEMLITE_SEP = "::"
GEMLITE_METADATA = "qbench_gemlite"


def _gemlite_tensors(state: dict, metadata: dict) -> dict:
    """Pop the gemlite-packed weights out of a loaded state dict, rebuilt."""
    layout = json.loads(metadata.pop(GEMLITE_METADATA, "{}"))
    if not layout:
        return {}
    import torch
    from torchao.prototype.quantization.uintx.uintx_bit_packed_tensor import UIntxBitPackedTensor

    out = {}
    for key, info in layout.items():
        parts = [state.pop(f"{key}{GEMLITE_SEP}{name}") for name in ("qdata", "scale", "zero_point")]
        out[key] = UIntxBitPackedTensor(
            *parts, info["gemlite_kwargs"], info["bit_width"], info["group_size"], getattr(torch, info["dtype"])
        )
    return out


def load_quantized_state(model, path: Path, device: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    raw = load_file(str(path), device=device)
    packed = _gemlite_tensors(raw, metadata)
    state, leftover = unflatten_tensor_state_dict(raw, metadata)
    state.update(packed)
    if leftover:
        raise QBenchError(
            f"corrupt torchao artifact {path}: unreadable tensors {sorted(leftover)[:3]}; "
            f"delete {path.parent} and run again"
        )
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if result.unexpected_keys:
        raise QBenchError(
            f"torchao artifact {path} does not fit this model (unexpected "
            f"{result.unexpected_keys[:3]}); delete {path.parent} and run again"
        )


@hookimpl
def register_backends(register):
    register(TorchAO())
