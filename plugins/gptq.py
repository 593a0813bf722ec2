"""GPTQ through gptqmodel (the maintained successor of AutoGPTQ, also what
transformers' ``GPTQConfig`` runs on): quantize with the suite's calibration
samples, or benchmark an existing GPTQ checkpoint as it is.

Quantization runs on the model in float32, the baseline's dtype, so the rows
differ from the baseline only by the quantization. The kernel is chosen at
load and recorded, because speed depends on it: on CPU the 4-bit weights run
through gptqmodel's ``TorchFusedLinear``, in a float32 model whose quantized
layers cast their activations to bfloat16 inside (gptqmodel 7.7), so the row
records bf16; other bit widths only have ``TorchLinear``, which computes in
bfloat16 too (said in the row's notes).
"""

from __future__ import annotations

import json
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from qbench.sdk import (
    DTYPES,
    HF_KV_CACHES,
    Artifact,
    Availability,
    Backend,
    ModulePatterns,
    QBenchError,
    VariantConfig,
    hookimpl,
)

#: gptqmodel's load-time kernels ("backends") by the names users pass.
KERNELS = {
    "torch": "gptq_torch",
    "torch_fused": "gptq_torch_fused",
    "triton": "gptq_triton",
    "marlin": "gptq_marlin",
    "exllama_v2": "gptq_exllama_v2",
    "machete": "gptq_machete",
    "bitblas": "gptq_bitblas",
    "torch_aten": "gptq_torch_aten",
}
#: Kernels gptqmodel builds only for CUDA (it refuses them on the CPU at load).
CUDA_KERNELS = ("triton", "marlin", "exllama_v2", "machete", "bitblas")


class GPTQConfig(VariantConfig):
    load_only = ("kernel", "compute_dtype")

    bits: int = Field(4, ge=2, le=8, description="weight bit width")
    group_size: int = Field(128, description="inputs per scale; -1: one scale per output channel")
    desc_act: bool = Field(False, description="quantize columns in order of decreasing activation (act-order)")
    sym: bool = Field(True, description="symmetric; false stores zero points")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="Hessian dampening, fraction of its mean diagonal")
    samples: Optional[int] = Field(None, gt=0, description="calibration rows to use (default: all of the suite's)")
    seq_len: Optional[int] = Field(None, gt=0, description="tokens per calibration row (default: the suite's)")
    keep: ModulePatterns = Field(("lm_head",), description="layers left in full precision ('+'-separated)")
    kernel: Literal[
        "auto", "torch", "torch_fused", "triton", "marlin", "exllama_v2", "machete", "bitblas", "torch_aten"
    ] = Field("auto", description="gptqmodel kernel at load (auto: see the module doc)")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="dtype the model loads in (auto: fp32 for the CPU's fused kernel, which computes in bf16 "
        "inside, else bf16 on CPU, fp16 on CUDA)",
    )
    path: Optional[str] = Field(None, description="prequantized: a GPTQ checkpoint folder or hub id, run as it is")

    @model_validator(mode="after")
    def _combination(self):
        if self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group_size must be -1 or a power of two >= 16, got {self.group_size}")
        if not any(fnmatchcase("lm_head", pattern) for pattern in self.keep):
            raise ValueError("keep must include lm_head: gptqmodel leaves the output head in full precision")
        if self.path is not None:
            changed = [
                k
                for k in ("bits", "group_size", "desc_act", "sym", "damp_percent", "samples", "seq_len", "keep")
                if getattr(self, k) != type(self).model_fields[k].default
            ]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} come from the checkpoint's own quantize config when path is set"
                )
        return self

    def nominal_bits(self) -> Optional[float]:
        # A prequantized checkpoint's width is only known from its files:
        # load() checks its layers instead.
        return None if self.path is not None else self.bits


def _import_gptqmodel() -> None:
    # gptqmodel sizes a CPU worker pool from this and refuses to load when the
    # pool outgrows the machine (seen with 2 cores): match the cores we have.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 4))))
    import gptqmodel  # noqa: F401


def _is_gptq_layer(module) -> bool:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return isinstance(module, BaseQuantLinear)


def quantized_layer_inputs(folder: Path, bits: int, method: str = "gptq") -> dict[str, int]:
    """Input features of each layer stored as codes in a checkpoint, from the
    safetensors headers alone: GPTQ's ``*.qweight`` packs 32 // bits codes per
    int32 row, AWQ's (GEMM layout) packs along the outputs and keeps one row
    per input."""
    per_row = 32 // bits if method == "gptq" else 1
    from safetensors import safe_open

    inputs = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".qweight"):
                    inputs[key.removesuffix(".qweight")] = handle.get_slice(key).get_shape()[0] * per_row
    return dict(sorted(inputs.items()))


def checkpoint_quantize_config(folder: Path, method: str = "gptq") -> dict[str, Any]:
    """The GPTQ settings a checkpoint declares: ``config.json``'s
    ``quantization_config`` (transformers, gptqmodel) or ``quantize_config.json``
    (AutoGPTQ-era checkpoints)."""
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    declared = config.get("quantization_config")
    if declared is None and (folder / "quantize_config.json").is_file():
        declared = json.loads((folder / "quantize_config.json").read_text())
    declared_method = (declared or {}).get("quant_method", "gptq")
    if not declared or declared_method != method:
        raise QBenchError(
            f"{folder} is not a {method.upper()} checkpoint (no quantization_config with quant_method "
            f"{method}, no quantize_config.json): pass the folder of a {method.upper()}-quantized model"
        )
    return declared


class GPTQ(Backend):
    name = "gptq"
    kv_caches = HF_KV_CACHES  # its sessions are transformers models
    description = "GPTQ via gptqmodel: calibrated 2/3/4/8-bit weights, or an existing GPTQ checkpoint (prequantized)"
    config_class = GPTQConfig
    requires = {"gptqmodel": "gptqmodel"}
    extra = "gptq"
    versions_of = ("gptqmodel", "torch")
    #: gptqmodel's quantization method, as checkpoints declare it (``quant_method``)
    method = "gptq"
    #: dtype the model is quantized in (the baseline's: the row differs from it only by the quantization)
    quantize_dtype = "float32"

    def variants(self) -> dict[str, VariantConfig]:
        return {
            "w4g128": GPTQConfig(),
            "w4g32": GPTQConfig(group_size=32),
            "w3g128": GPTQConfig(bits=3),
            "w8g128": GPTQConfig(bits=8),
            "prequantized": GPTQConfig(path=""),
        }

    def needs_calibration(self, config: GPTQConfig) -> bool:
        return config.path is None

    def variant_available(self, config: GPTQConfig, device: str) -> Availability:
        if config.path == "":
            return Availability.no(f"needs the checkpoint: -b {self.name}:prequantized:path=FOLDER_OR_HUB_ID")
        if device == "cpu" and config.kernel in CUDA_KERNELS:
            return Availability.no(
                f"gptqmodel's {config.kernel} kernel runs on CUDA only: use --device cuda, or kernel=auto on the CPU"
            )
        if device == "cuda" and config.runtime == "compiled":
            # Compiled, gptqmodel's CUDA layers decoded wrong tokens (docs/gpu.md; tests/test_gpu.py says when
            # that stops). AWQ rows load through the same gptqmodel path.
            return Availability.no(
                "runtime=compiled decodes wrong tokens through gptqmodel's CUDA layers (GPTQ's Marlin and "
                "Triton: the compiled step repeats its first token; docs/gpu.md): use runtime=eager for "
                f"{self.name} rows on CUDA"
            )
        return self.available(device)

    def default_skip_reason(self, config: GPTQConfig, device: str) -> Optional[str]:
        if device == "cpu" and config.path is None and config.bits != 4 and config.kernel == "auto":
            return (
                "gptqmodel's only CPU kernel for this width (TorchLinear) dequantizes on every call, in "
                "bfloat16: several minutes per cell"
            )
        return None

    def quantize_config(self, config: GPTQConfig):
        """gptqmodel's quantize config for these settings."""
        from gptqmodel import QuantizeConfig

        return QuantizeConfig(
            bits=config.bits,
            group_size=config.group_size,
            desc_act=config.desc_act,
            sym=config.sym,
            damp_percent=config.damp_percent,
            fallback=None,
        )  # no silent round-to-nearest for layers seeing few tokens

    def kernel_and_dtype(
        self, config: GPTQConfig, bits: int, group: int, in_features: list[int], device: str
    ) -> tuple[str, str, Optional[str]]:
        return _kernel_and_dtype(config, bits, group, in_features, device)

    def cache_inputs(self, config: GPTQConfig) -> Optional[str]:
        """A prequantized checkpoint is read in place: its content is part of the key."""
        if not config.path:
            return None
        from qbench.sdk import fingerprint

        return fingerprint(resolve_checkpoint(config.path))

    def check_inputs(self, config: GPTQConfig, model_path: Path) -> None:
        if config.path:
            _check_prequantized(Path(model_path), config, self.method)

    def quantize(self, model_path: Path, config: GPTQConfig, calibration, workdir: Path) -> dict[str, Any]:
        if config.path is not None:
            return _check_prequantized(model_path, config, self.method)
        import torch

        from qbench.sdk import planned_layers, report_progress

        _import_gptqmodel()
        from gptqmodel import GPTQModel

        if not calibration:
            raise QBenchError(f"{self.name} needs calibration samples: add a calibration section to the suite")
        rows = [row[: config.seq_len] for row in calibration[: config.samples]]
        model_rows = [
            {"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long)}
            for row in rows
        ]
        qconfig = self.quantize_config(config)
        _, kept = planned_layers(str(model_path), config.keep)
        # gptqmodel quantizes every linear layer of the decoder blocks and never
        # lm_head: other exclusions are per-module "dynamic" rules.
        skip = [name for name in kept if name != "lm_head"]
        if skip:
            qconfig.dynamic = {f"-:^{re.escape(name)}$": {} for name in skip}
        model = GPTQModel.load(str(model_path), qconfig, device="cpu", dtype=getattr(torch, self.quantize_dtype))
        blocks = _decoder_blocks(model.model)
        hooks = [block.register_forward_pre_hook(_progress_hook(i, len(blocks))) for i, block in enumerate(blocks)]
        # gptqmodel writes its per-layer log under ./logs: keep it in the
        # artifact, not in whatever folder qbench was started from.
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            model.quantize(model_rows, batch_size=1)
        finally:
            os.chdir(cwd)
            for hook in hooks:
                hook.remove()
        report_progress("saving")
        model.save(str(workdir))
        written = quantized_layer_inputs(workdir, config.bits, self.method)
        if not written:
            raise QBenchError("gptqmodel wrote no quantized layers: nothing to benchmark")
        return {
            "quantized_layers": len(written),
            "kept_full_precision": kept,
            "calibration_rows": len(rows),
            "calibration_tokens": sum(len(r) for r in rows),
            "act_group_aware": bool(getattr(qconfig, "act_group_aware", False)),
            **_quant_log_summary(workdir),
        }

    def load(self, artifact: Artifact, device: str):
        import torch

        from qbench.sdk import HFSession, require_quantized_layers

        config = self.config_class(**artifact.config)
        _import_gptqmodel()
        from gptqmodel import BACKEND, GPTQModel

        folder = Path(artifact.meta.get("checkpoint") or artifact.path)
        declared = checkpoint_quantize_config(folder, self.method)
        bits, group = int(declared.get("bits", config.bits)), int(declared.get("group_size", config.group_size))
        inputs = quantized_layer_inputs(folder, bits, self.method)
        kernel, dtype, why = self.kernel_and_dtype(config, bits, group, list(inputs.values()), device)
        if kernel == "gptq_torch" and device == "cpu":
            # TorchLinear compiles its dequantization with torch.compile, which
            # recompiles per layer and shape on CPU (seconds per decoded token):
            # eager is several times faster here. This worker runs one cell only.
            torch._dynamo.config.disable = True
        model = GPTQModel.load(str(folder), device=device, backend=BACKEND(kernel), dtype=getattr(torch, dtype))
        hf_model = model.model.eval()
        expected = list(inputs)
        require_quantized_layers(hf_model, expected, _is_gptq_layer, self.name)
        kernel_class = type(hf_model.get_submodule(expected[0])).__name__
        # TorchFusedLinear casts float32 activations to bf16 and back around its
        # int4 matmul on the CPU: the quantized layers compute in bf16 whatever
        # the model's dtype (an fp32 input's low bits never reach them).
        computes = "bfloat16" if kernel_class == "TorchFusedLinear" and device == "cpu" else dtype
        facts = {
            "kernel": f"gptqmodel {kernel_class}",
            "compute_dtype": f"torch.{computes}",
            "checkpoint_bits": bits,
            "checkpoint_group_size": group,
            "checkpoint_desc_act": declared.get("desc_act"),
            "torch_compile": not (kernel == "gptq_torch" and device == "cpu"),
        }
        if why:
            facts["notes"] = [why]
        return HFSession(hf_model, device, facts)


def _kernel_and_dtype(
    config: GPTQConfig, bits: int, group: int, in_features: list[int], device: str
) -> tuple[str, str, Optional[str]]:
    """(gptqmodel backend, the model's dtype, note or None). On CPU the fused
    4-bit kernel (it takes float32 activations) needs every layer's inputs to be a multiple
    of the group size; anything else goes to TorchLinear, which dequantizes
    on every call and computes in bfloat16 or float16 only."""
    note = None
    if config.kernel != "auto":
        kernel = KERNELS[config.kernel]
    elif device != "cpu":
        kernel = "auto"
    elif bits == 4 and (group == -1 or all(k % group == 0 for k in in_features)):
        kernel = "gptq_torch_fused"
    else:
        kernel = "gptq_torch"
        odd = sum(1 for k in in_features if group != -1 and k % group)
        note = (
            f"{odd} of {len(in_features)} layers' input features are not a multiple of the group size {group}"
            if bits == 4 and odd
            else f"no fused CPU kernel for {bits}-bit GPTQ"
        ) + ": gptqmodel's TorchLinear ran (dequantizes on every call, so decoding is slow)"
    if config.compute_dtype != "auto":
        return kernel, DTYPES[config.compute_dtype], note
    if kernel == "gptq_torch_fused":
        return kernel, "float32", note
    # The report notes a dtype other than the baseline's (qbench.core.dtypes.cast_note).
    return kernel, "bfloat16" if device == "cpu" else "float16", note


def resolve_checkpoint(path: str) -> Path:
    from qbench.sdk import from_hub

    local = Path(path).expanduser()
    if local.exists():
        return local.resolve()
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise QBenchError(f"GPTQ checkpoint '{path}' not found: pass a local folder or a hub id like 'org/name'")
    return from_hub(path)


def _check_prequantized(model_path: Path, config: GPTQConfig, method: str) -> dict[str, Any]:
    folder = resolve_checkpoint(config.path)
    declared = checkpoint_quantize_config(folder, method)
    ours = json.loads((model_path / "config.json").read_text())
    theirs = json.loads((folder / "config.json").read_text())
    if ours.get("vocab_size") != theirs.get("vocab_size"):
        raise QBenchError(
            f"GPTQ checkpoint {folder} has vocabulary size {theirs.get('vocab_size')}, the run's model "
            f"{ours.get('vocab_size')}: it is not a quantization of this model; pass --model its base model"
        )
    declared_bits = int(declared.get("bits", 4))
    if not quantized_layer_inputs(folder, declared_bits, method):
        raise QBenchError(f"GPTQ checkpoint {folder} holds no quantized layers (*.qweight tensors)")
    notes = []
    if ours.get("model_type") != theirs.get("model_type") or ours.get("hidden_size") != theirs.get("hidden_size"):
        notes.append(
            f"checkpoint architecture ({theirs.get('model_type')}, hidden {theirs.get('hidden_size')}) "
            f"differs from the run's model ({ours.get('model_type')}, hidden {ours.get('hidden_size')})"
        )
    notes.append(
        "prequantized checkpoint benchmarked as it is: fidelity is measured against this run's baseline "
        "model, which may not be the exact weights it was quantized from"
    )
    return {
        "checkpoint": str(folder),
        "source": config.path,
        "declared": {
            k: declared.get(k)
            for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format", "format", "quantizer")
            if k in declared
        },
        "notes": notes,
    }


def _decoder_blocks(model) -> list:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def _progress_hook(index: int, total: int):
    from qbench.sdk import report_progress

    seen = False

    def hook(_module, _args):
        nonlocal seen
        if not seen:
            seen = True
            report_progress(f"GPTQ layer {index + 1} of {total}")

    return hook


def _quant_log_summary(folder: Path) -> dict[str, Any]:
    """gptqmodel's per-layer log: mean and worst reconstruction loss."""
    import csv

    path = folder / "quant_log.csv"
    if not path.is_file():
        return {}
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    losses = []
    for row in rows:
        try:
            losses.append(float(row.get("loss", "nan")))
        except ValueError:
            continue
    losses = [x for x in losses if x == x]
    if not losses:
        return {}
    return {"gptq_loss_mean": sum(losses) / len(losses), "gptq_loss_max": max(losses)}


@hookimpl
def register_backends(register):
    register(GPTQ())
