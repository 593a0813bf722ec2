"""Quantization-aware training through torchao's QAT API: the chosen linear
layers are fake-quantized (``QATConfig(base, step="prepare")``), the whole
model is fine-tuned for a bounded number of steps on the variant's
calibration set, then converted (``step="convert"``) to the very tensors
torchao's post-training path produces for the same settings.

So ``qat:int4-wo-g32`` sits beside ``torchao:int4-wo-g32`` (same layout,
same bytes, same kernel) and the two rows differ only by the training: PTQ
against QAT is one comparison. The artifact is torchao's (the whole model's
tensors, the fine-tuned embeddings and norms included) and loads through the
torchao backend.

Training settings (steps, learning rate, rows and their length) come from the
suite's ``qat`` section unless the variant sets them; the values used are in
the record and the artifact cache key.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from qbench.sdk import (
    HF_KV_CACHES,
    Artifact,
    Availability,
    Backend,
    ModulePatterns,
    QBenchError,
    VariantConfig,
    hookimpl,
)


class QATConfig(VariantConfig):
    bits: int = Field(4, ge=2, le=4, description="weight bit width (torchao's QAT covers intx weights, 2-4 bit here)")
    granularity: str = Field("group:32", description="weight scales: channel or group:N")
    symmetric: bool = True
    activations: Literal["none", "dynamic"] = Field(
        "none", description="dynamic: int8 per-token activations too (8da4w)"
    )
    keep: ModulePatterns = Field(("lm_head",), description="layers left in full precision ('+'-separated)")
    steps: Optional[int] = Field(None, gt=0, description="optimizer steps (default: the suite's qat.steps)")
    lr: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description="learning rate (default: qat.lr)")
    seq_len: Optional[int] = Field(None, gt=1, description="tokens per training row (default: qat.seq_len)")
    batch_size: Optional[int] = Field(None, gt=0, description="rows per step (default: qat.batch_size)")
    objective: Literal["distill", "next-token"] = Field(
        "distill",
        description="distill: KL divergence to the full-precision model's next-token distribution "
        "(the fidelity qbench measures; LLM-QAT's data-free recipe); next-token: "
        "cross-entropy on the text",
    )

    def nominal_bits(self) -> Optional[float]:
        return self.bits

    def torchao(self):
        """The torchao post-training variant with the same quantization settings."""
        from qbench_plugins.torchao_ptq import TorchAOConfig

        return TorchAOConfig(
            bits=self.bits,
            granularity=self.granularity,
            symmetric=self.symmetric,
            activations=self.activations,
            keep=self.keep,
            runtime=self.runtime,
            compile_mode=self.compile_mode,
            calibration=self.calibration,
        )


def training_rows(calibration: list[list[int]], seq_len: int) -> list[list[int]]:
    """The calibration samples as one stream cut into rows of ``seq_len``."""
    stream = [token for row in calibration for token in row]
    rows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not rows:
        raise QBenchError(
            f"qat: the calibration set holds {len(stream)} tokens, fewer than one training row of "
            f"{seq_len}: lower qat.seq_len or raise the calibration samples in the suite"
        )
    return rows


def fine_tune(model, rows: list[list[int]], config: QATConfig, teacher=None) -> list[float]:
    """AdamW over the rows, cycled in order: next-token cross-entropy, or
    with a ``teacher``, the KL divergence from its distribution to the
    model's at every position. Returns the loss of every step."""
    import torch
    import torch.nn.functional as F

    from qbench.sdk import report_progress

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    losses = []
    started = time.perf_counter()
    for step in range(config.steps):
        first = (step * config.batch_size) % len(rows)
        batch = torch.tensor([rows[(first + i) % len(rows)] for i in range(config.batch_size)])
        if teacher is None:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        else:
            with torch.no_grad():
                target = teacher(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
            logits = model(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
            loss = F.kl_div(logits.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        report_progress(
            f"QAT step {step + 1}/{config.steps}, loss {losses[-1]:.3f}, {time.perf_counter() - started:.0f} s"
        )
    model.eval()
    return losses


class QAT(Backend):
    name = "qat"
    kv_caches = HF_KV_CACHES  # its sessions are transformers models
    description = "Quantization-aware training (torchao QAT): fake-quantize, fine-tune, convert to torchao's layout"
    config_class = QATConfig
    requires = {"torchao": "torchao"}
    extra = "torchao"
    versions_of = ("torchao", "torch")
    uses_calibration = True

    def variants(self) -> dict[str, VariantConfig]:
        return {"int4-wo-g32": QATConfig(), "8da4w-g32": QATConfig(activations="dynamic")}

    def default_skip_reason(self, config: QATConfig, device: str) -> Optional[str]:
        if config.activations == "dynamic":
            return (
                "its post-training pair is run by name too (-b torchao:bits=4,granularity=group:32,activations=dynamic)"
            )
        return None

    def variant_available(self, config: QATConfig, device: str) -> Availability:
        if config.torchao().needs_cuda:
            return Availability.no("QAT converts to torchao's portable intx layout, not a CUDA-only kernel")
        return self.available(device)

    def with_suite(self, config: QATConfig, suite: Any) -> QATConfig:
        spec = suite.qat
        return config.model_copy(
            update={
                name: getattr(spec, name)
                for name in ("steps", "lr", "seq_len", "batch_size")
                if getattr(config, name) is None
            }
        )

    def quantize(self, model_path: Path, config: QATConfig, calibration, workdir: Path) -> dict[str, Any]:
        import json

        import torch
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig as TorchaoQAT

        from qbench.sdk import linear_layers, load_causal_lm, report_progress
        from qbench_plugins.torchao_ptq import (
            LAYOUT_FILE,
            WEIGHTS_FILE,
            layer_config,
            save_quantized_state,
        )

        if None in (config.steps, config.lr, config.seq_len, config.batch_size):
            raise QBenchError("qat: training settings missing (the suite's qat section fills them in a run)")
        if not calibration:
            raise QBenchError("qat fine-tunes on the suite's calibration set: add a calibration section to the suite")
        rows = training_rows(calibration, config.seq_len)
        model = load_causal_lm(str(model_path), torch.float32)
        teacher = load_causal_lm(str(model_path), torch.float32).eval() if config.objective == "distill" else None
        layers = linear_layers(model, config.keep)
        if not layers:
            raise QBenchError(f"no linear layers left to quantize with keep={'+'.join(config.keep)}")
        # Layers whose input features the group size does not divide fall back
        # to per-channel scales, as in the post-training path: group them by config.
        groups: dict[str, tuple[Any, list[str]]] = {}
        notes = set()
        for name, layer in layers.items():
            base, note = layer_config(config.torchao(), layer.in_features)
            groups.setdefault(repr(base), (base, []))[1].append(name)
            if note:
                notes.add(note)
        for step in ("prepare", "convert"):
            if step == "convert":
                losses = fine_tune(model, rows, config, teacher)
                del teacher
                report_progress("converting")
            for base, names in groups.values():
                chosen = set(names)
                quantize_(model, TorchaoQAT(base, step=step), filter_fn=lambda _m, fqn, chosen=chosen: fqn in chosen)
        save_quantized_state(model, workdir / WEIGHTS_FILE)
        (workdir / LAYOUT_FILE).write_text(json.dumps({"layers": list(layers)}))
        meta: dict[str, Any] = {
            "quantized_layers": len(layers),
            "training_rows": len(rows),
            "training_tokens": config.steps * config.batch_size * config.seq_len,
            "epochs": round(config.steps * config.batch_size / len(rows), 2),
            "loss_first_steps": round(sum(losses[:5]) / len(losses[:5]), 4),
            "loss_last_steps": round(sum(losses[-5:]) / len(losses[-5:]), 4),
            "torchao_config": type(next(iter(groups.values()))[0]).__name__,
        }
        if notes:
            meta["notes"] = sorted(notes)
        return meta

    def load(self, artifact: Artifact, device: str):
        from qbench_plugins.torchao_ptq import TorchAO

        config = QATConfig(**artifact.config)
        return TorchAO().load(artifact.model_copy(update={"config": config.torchao().settings()}), device)


@hookimpl
def register_backends(register):
    register(QAT())
