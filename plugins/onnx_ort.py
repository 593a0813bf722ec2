"""ONNX Runtime: the model exported once by onnxruntime-genai's model builder
(optimum-onnx cannot live beside transformers 5), run through a plain
``onnxruntime.InferenceSession`` so that batching, padding and the greedy loop
are the harness's, exactly as for the PyTorch backends.

Variants: ``fp32`` (the exported graph at full precision: export effects apart
from quantization effects; CPU), ``fp16`` (CUDA), ``int8`` / ``int4``
weight-only (MatMulNBits, block size a setting) from the builder, and
``int8-dyn`` (dynamic int8 weights and activations; CPU) from
``onnxruntime.quantization.quantize_dynamic`` applied to the fp32 export.
The graph is exported for the run's device (the builder's execution
provider), so a CUDA run gets the CUDA graph and ORT's CUDA provider.
``runtime=compiled`` (CUDA) decodes through ONNX Runtime's own CUDA graphs
over a fixed-size KV cache (``StaticDecode``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from qbench.sdk import Artifact, Availability, Backend, QBenchError, Session, VariantConfig, hookimpl

MODEL_FILE = "model.onnx"
QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"}
#: Ops that carry a step's work: on the CPU they would make a CUDA row a CPU one.
HEAVY_OPS = QUANTIZED_OPS | {
    "MatMul",
    "Gemm",
    "Attention",
    "GroupQueryAttention",
    "MultiHeadAttention",
    "PagedAttention",
    "GatherBlockQuantized",
    "SkipSimplifiedLayerNormalization",
}


class OnnxConfig(VariantConfig):
    precision: Literal["fp32", "fp16", "int8", "int4"] = Field(
        "fp32", description="fp16 is for CUDA; int8/int4: weight-only MatMulNBits (see accuracy_level)"
    )
    target: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="the execution provider the graph is exported for (the builder's -e); auto: the run's --device",
    )
    activations: Literal["none", "dynamic"] = Field(
        "none", description="dynamic: int8 weights and activations via onnxruntime.quantization"
    )
    block_size: int = Field(32, description="weights per scale for int8/int4 MatMulNBits: 16|32|64|128|256")
    symmetric: bool = True
    accuracy_level: Optional[int] = Field(
        None,
        description="int8/int4: the least precise input MatMulNBits may compute with (4: int8 activations, "
        "3: bf16, 2: fp16, 1: fp32, 0: the graph's dtype); unset: the builder's choice for the target "
        "(4 on the CPU, 0 on CUDA)",
        ge=0,
        le=4,
    )
    keep_lm_head: bool = Field(True, description="leave the output head in full precision")
    fuse_gate_up: bool = Field(
        False,
        description="one MatMul for the MLP's gate and up projections (the builder's "
        "fuse_mlp_gate_up): one launch per layer fewer, the same bytes",
    )

    @model_validator(mode="after")
    def _combination(self):
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.activations == "dynamic" and self.precision != "int8":
            raise ValueError("activations=dynamic needs precision=int8")
        if self.accuracy_level is not None and (self.precision not in ("int8", "int4") or self.activations != "none"):
            raise ValueError("accuracy_level applies to precision=int8 or int4 (weight-only MatMulNBits)")
        return self

    def nominal_bits(self) -> Optional[float]:
        return {"fp32": None, "fp16": None, "int8": 8, "int4": 4}[self.precision]


#: ONNX element type -> (numpy dtype name, torch dtype name) of the buffers bound to it
ORT_TYPES = {"tensor(float)": ("float32", "float32"), "tensor(float16)": ("float16", "float16")}


class OnnxSession(Session):
    """An exported decoder with a KV cache: logits for every position, and
    our own greedy loop feeding ``present.*`` back as ``past_key_values.*``.

    Runs through ORT's I/O binding on both devices: the cache stays where ORT
    put it (on the GPU, on CUDA) from step to step, and logits land in a torch
    tensor on the session's device. On CUDA, ORT runs on torch's current
    stream, so the harness's CUDA events time ORT's kernels and no buffer is
    reused while the other library still reads it."""

    def __init__(self, folder: Path, device: str, facts: dict[str, Any]):
        import torch

        config = json.loads((folder / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.layers, self.kv_heads = decoder["num_hidden_layers"], decoder["num_key_value_heads"]
        self.head_size, self.vocab = decoder["head_size"], config["vocab_size"]
        self.folder, self.device = folder, device
        self.gpus = [torch.cuda.current_device()] if device == "cuda" else []
        self.bind_at = ("cuda", self.gpus[0]) if device == "cuda" else ("cpu", 0)
        #: Set by use_runtime("compiled"): decode over a fixed-size cache (StaticDecode).
        self.static: Optional[StaticDecode] = None
        #: Run options of every pass outside a captured graph (None: ORT's defaults).
        self.uncaptured = None
        self.session = self._open(profile=device == "cuda")
        types = {v.name: v.type for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        past_type = next(t for n, t in types.items() if n.startswith("past_key_values"))
        self.past_dtype = ORT_TYPES[past_type][0]
        self.logits_np, torch_name = ORT_TYPES[types["logits"]]
        self.logits_dtype = getattr(torch, torch_name)
        self.present_names = [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]
        # Parsed once: weight_bytes is asked more than once.
        self._weight_bytes = graph_weight_bytes(folder / MODEL_FILE)
        self.facts = {
            **facts,
            "providers": self.session.get_providers(),
            "compute_dtype": compute_dtype(folder / MODEL_FILE, self.logits_np),
        }
        if device == "cuda":
            self.facts["ops_on_cpu"] = self._ops_on_cpu()
            self.facts["notes"] = [
                "ONNX Runtime holds its CUDA memory in its own arena: this row's PyTorch "
                "allocator figures (cuda_peak_*) do not count it"
            ]

    def _open(self, profile: bool = False, stream=None):
        """An ORT session of the graph on the session's device. On CUDA it
        runs on ``stream`` (default: torch's current one); with a stream of
        its own, ORT also captures CUDA graphs (use_runtime)."""
        import onnxruntime as ort
        import torch

        options = ort.SessionOptions()
        if self.device == "cuda":
            cuda = {
                "device_id": self.gpus[0],
                "has_user_compute_stream": "1",
                "user_compute_stream": str((stream or torch.cuda.current_stream()).cuda_stream),
            }
            if stream is not None:
                cuda["enable_cuda_graph"] = "1"
            providers = [("CUDAExecutionProvider", cuda)]
            if profile:
                # ORT runs a node without a CUDA kernel on the CPU, silently: one
                # profiled pass at load says where each node ran (_ops_on_cpu).
                options.enable_profiling = True
                options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="qbench-ort-")) / "load")
        else:
            providers = ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(self.folder / MODEL_FILE), options, providers=providers)
        except Exception as exc:  # ORT's own words: which node, which kernel
            raise QBenchError(f"onnxruntime cannot run this graph on {self.device}: {ort_reason(exc)}") from None
        if self.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            # ORT drops an unavailable provider silently: never time CPU as CUDA.
            raise QBenchError("onnxruntime did not enable its CUDA provider: pip install onnxruntime-gpu")
        return session

    def _ops_on_cpu(self) -> dict[str, int]:
        """Run 8 tokens with the profiler on, then stop it: the op types ORT
        placed on its CPU provider. Shape arithmetic there is ORT's own
        choice; a matmul or attention there would time the CPU as CUDA."""
        import numpy as np

        self._run(np.arange(3, 11, dtype=np.int64)[None], np.ones((1, 8), dtype=np.int64), self._empty_past(1))
        trace = Path(self.session.end_profiling())
        events = json.loads(trace.read_text())
        shutil.rmtree(trace.parent, ignore_errors=True)
        on_cpu = Counter(
            e["args"]["op_name"]
            for e in events
            if e.get("cat") == "Node" and e.get("args", {}).get("provider") == "CPUExecutionProvider"
        )
        heavy = sorted(set(on_cpu) & HEAVY_OPS)
        if heavy:
            raise QBenchError(
                f"onnxruntime has no CUDA kernel for this graph's {', '.join(heavy)} and would run "
                "them on the CPU: refusing to time that as CUDA"
            )
        return dict(on_cpu)

    def _empty_past(self, batch: int) -> dict:
        import numpy as np

        shape = (batch, self.kv_heads, 0, self.head_size)
        return {
            f"past_key_values.{i}.{kind}": np.zeros(shape, dtype=self.past_dtype)
            for i in range(self.layers)
            for kind in ("key", "value")
        }

    def _run(self, ids, mask, past: dict):
        """One pass: ``ids`` and ``mask`` are host arrays, ``past`` host arrays
        or the previous pass's OrtValues. Returns the logits (a torch tensor
        on the session's device) and the new cache (OrtValues where ORT made
        them)."""
        import numpy as np
        import torch

        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        logits = torch.empty((*ids.shape, self.vocab), dtype=self.logits_dtype, device=self.device)
        binding.bind_output(
            "logits",
            *self.bind_at,
            element_type=np.dtype(self.logits_np),
            shape=tuple(logits.shape),
            buffer_ptr=logits.data_ptr(),
        )
        for name in self.present_names:
            binding.bind_output(name, *self.bind_at)
        self.session.run_with_iobinding(binding, self.uncaptured)
        present = binding.get_outputs()[1:]
        return logits, {f"past_key_values.{n[len('present.') :]}": v for n, v in zip(self.present_names, present)}

    def logits(self, input_ids, attention_mask):
        ids = input_ids.cpu().numpy().astype("int64")
        logits, _ = self._run(ids, attention_mask.cpu().numpy().astype("int64"), self._empty_past(ids.shape[0]))
        return logits

    def generate(self, input_ids, max_new_tokens: int, on_token: Callable[[], None]):
        import numpy as np
        import torch

        if self.static is not None:
            return self.static.generate(input_ids, max_new_tokens, on_token)
        ids = input_ids.cpu().numpy().astype("int64")
        mask = np.ones_like(ids)
        past = self._empty_past(ids.shape[0])
        produced = []
        step = ids
        for _ in range(max_new_tokens):
            logits, past = self._run(step, mask, past)
            # ORT's run returns when its work is done; .cpu() waits for the argmax
            step = logits[:, -1].argmax(-1, keepdim=True).cpu().numpy()
            on_token()
            produced.append(step)
            mask = np.concatenate([mask, np.ones_like(step)], axis=1)
        return torch.from_numpy(np.concatenate(produced, axis=1))

    def weight_bytes(self) -> int:
        return self._weight_bytes

    def use_runtime(self, runtime: str, compile_mode: str = "max-autotune") -> Optional[str]:
        """``compiled``: ONNX Runtime's own CUDA graphs (``enable_cuda_graph``)
        over a fixed-size KV cache, one graph per batch size and length: the
        graph's counterpart of PyTorch's compiled runtime. ``compile_mode``
        is torch.compile's and does not apply."""
        if runtime == "eager":
            self.static = None
            return None
        if compile_mode != "max-autotune":  # the default, left as it is when nobody sets it
            return f"compile_mode={compile_mode} is torch.compile's; ONNX Runtime's CUDA graphs have no modes"
        if self.device != "cuda":
            return "runtime=compiled on an ONNX row is ONNX Runtime's CUDA graphs: CUDA only"
        import torch

        stream = torch.cuda.Stream(self.gpus[0])  # capture cannot run on the legacy default stream
        del self.session  # the weights once on the GPU, not twice
        try:
            self.session = self._open(stream=stream)
        except QBenchError as error:
            self.session = self._open()
            return f"ONNX Runtime refused CUDA graphs for this graph: {error}"
        # A graph-enabled session would capture any pass under graph id 0:
        # logits() and prefill say -1 (no capture), whatever their shapes.
        self.uncaptured = graph_run_options(-1)
        self.static = StaticDecode(self, stream)
        self.facts["runtime"] = (
            "ONNX Runtime CUDA graphs (enable_cuda_graph), one per batch size and length, over "
            "a fixed-size KV cache that past and present share; prefill runs uncaptured"
        )
        return None

    def kv_bytes_per_position(self) -> Optional[int]:
        import numpy as np

        return 2 * self.layers * self.kv_heads * self.head_size * np.dtype(self.past_dtype).itemsize

    def describe(self) -> dict[str, Any]:
        return dict(self.facts)


class StaticDecode:
    """Greedy decode over a KV cache of fixed size, the layout ONNX Runtime's
    CUDA graphs need (fixed shapes and addresses from step to step).

    The builder's GroupQueryAttention reads past and writes present in place
    when both are bound to one buffer ``[batch, kv_heads, length, head]``
    (past_present_share_buffer, as onnxruntime-genai runs it); the attention
    mask is ``[batch, length]`` with ones up to and including the position
    fed, so every decode step binds the same tensors and only their contents
    change. Prefill runs uncaptured (``gpu_graph_id=-1``) with the prompt's
    own mask; each (batch, length) gets its own graph id, captured by ORT
    after its warm-up runs and replayed from then on. Without a stream (on the CPU) the same loop
    runs without graphs: it is how CI checks the layout."""

    def __init__(self, owner: OnnxSession, stream=None):
        self.owner, self.stream = owner, stream
        self.shapes: dict[tuple[int, int], dict[str, Any]] = {}  # (batch, length) -> buffers and binding

    def _bind(self, binding, name: str, tensor, output: bool = False) -> None:
        import numpy as np

        kind = "bind_output" if output else "bind_input"
        getattr(binding, kind)(
            name,
            *self.owner.bind_at,
            np.dtype(str(tensor.dtype).removeprefix("torch.")),
            tuple(tensor.shape),
            tensor.data_ptr(),
        )

    def _buffers(self, batch: int, length: int) -> dict[str, Any]:
        """The tensors and the decode binding of one (batch, length), kept for
        the session's life: a captured graph holds their addresses."""
        import torch

        if (batch, length) in self.shapes:
            return self.shapes[(batch, length)]
        o = self.owner
        dev = o.device
        cache_dtype = getattr(torch, o.past_dtype)
        state = {
            "graph_id": len(self.shapes) + 1,
            "ids": torch.zeros((batch, 1), dtype=torch.int64, device=dev),
            "mask": torch.zeros((batch, length), dtype=torch.int64, device=dev),
            "logits": torch.empty((batch, 1, o.vocab), dtype=o.logits_dtype, device=dev),
            "cache": {
                n: torch.zeros((batch, o.kv_heads, length, o.head_size), dtype=cache_dtype, device=dev)
                for n in o.present_names
            },
        }
        binding = o.session.io_binding()
        self._bind_step(binding, state, state["ids"], state["logits"])
        state["binding"] = binding
        self.shapes[(batch, length)] = state
        return state

    def _bind_step(self, binding, state: dict[str, Any], ids, logits, mask=None) -> None:
        self._bind(binding, "input_ids", ids)
        self._bind(binding, "attention_mask", state["mask"] if mask is None else mask)
        for name, buffer in state["cache"].items():
            self._bind(binding, "past_key_values." + name.removeprefix("present."), buffer)
            self._bind(binding, name, buffer, output=True)
        self._bind(binding, "logits", logits, output=True)

    def generate(self, input_ids, max_new_tokens: int, on_token: Callable[[], None]):
        import contextlib

        import torch

        o = self.owner
        batch, prompt = input_ids.shape
        state = self._buffers(batch, prompt + max_new_tokens)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            mask = state["mask"]
            mask.zero_()
            mask[:, :prompt] = 1
            ids = input_ids.to(o.device, torch.int64)
            logits = torch.empty((batch, prompt, o.vocab), dtype=o.logits_dtype, device=o.device)
            prefill = o.session.io_binding()
            # The prompt's own mask: attention sees a first prompt (ORT's GQA
            # takes a longer mask as a continuation, batch 1 only), and writes
            # it into the shared cache from position 0.
            prompt_mask = mask[:, :prompt].contiguous()  # held: ORT reads it by address
            self._bind_step(prefill, state, ids, logits, prompt_mask)
            o.session.run_with_iobinding(prefill, o.uncaptured)  # returns once ORT's stream is done
            produced = torch.empty((batch, max_new_tokens), dtype=torch.int64, device=o.device)
            step_options = graph_run_options(state["graph_id"]) if self.stream is not None else None
            for i in range(max_new_tokens):
                if i:
                    state["ids"].copy_(produced[:, i - 1 : i])
                    mask[:, prompt + i - 1] = 1
                    o.session.run_with_iobinding(state["binding"], step_options)
                    logits = state["logits"]
                produced[:, i] = logits[:, -1].argmax(-1)
                on_token()
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return produced.cpu()


def ort_reason(exc: Exception, limit: int = 400) -> str:
    """ORT's message without its C++ frame (``/onnxruntime_src/FILE:LINE
    SIGNATURE``), which can fill the line before the reason starts."""
    text = str(exc).strip().splitlines()[-1]
    text = re.sub(r"/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\)( \[with [^\]]*\])? ", "", text)
    return text[:limit]


def graph_run_options(graph_id: int):
    """ORT run options for a graph-enabled CUDA session: capture or replay
    graph ``graph_id`` (1, 2, ...), or run uncaptured (-1)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


def _graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


#: MatMulNBits' ``accuracy_level``: the least precise input the op may
#: compute with (0: the graph's own dtype). onnxruntime-genai's builder asks
#: for 4 on the CPU and 0 elsewhere.
ACCURACY_LEVELS = {1: "float32", 2: "float16", 3: "bfloat16", 4: "int8 activations where ONNX Runtime has the kernel"}


def compute_dtype(path: Path, graph_dtype: str) -> str:
    """What the graph's quantized matmuls compute in: int8 activations where
    quantize_dynamic put its int8 matmuls, else MatMulNBits' accuracy level's
    input type, else the graph's dtype (no quantized matmul, or level 0)."""
    nodes = _graph(path).graph.node
    if any(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in nodes):
        return "int8 activations, quantized at run time (dynamic)"
    levels = {
        attr.i
        for node in nodes
        if node.op_type == "MatMulNBits"
        for attr in node.attribute
        if attr.name == "accuracy_level"
    }
    level = max(levels, default=0)
    return f"{ACCURACY_LEVELS[level]} (MatMulNBits accuracy_level {level})" if level else graph_dtype


def op_counts(path: Path) -> Counter:
    return Counter(node.op_type for node in _graph(path).graph.node)


def graph_weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (inline or in the external data file)."""
    total = 0
    for init in _graph(path).graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        total += int(external["length"]) if "length" in external else len(init.raw_data)
    return total


class OnnxRuntime(Backend):
    name = "onnx"
    description = "ONNX Runtime: onnxruntime-genai's exporter, MatMulNBits int8/int4, dynamic int8 (ORT quantization)"
    config_class = OnnxConfig
    requires = {
        "onnxruntime": "onnxruntime",
        "onnxruntime_genai": "onnxruntime-genai",
        "onnx_ir": "onnx-ir",
        "onnx": "onnx",
    }
    extra = "onnx"

    def variants(self) -> dict[str, VariantConfig]:
        return {
            "fp32": OnnxConfig(),
            "fp16": OnnxConfig(precision="fp16"),
            "int8": OnnxConfig(precision="int8"),
            "int4": OnnxConfig(precision="int4"),
            "int8-dyn": OnnxConfig(precision="int8", activations="dynamic"),
        }

    def version(self) -> Optional[str]:
        import onnxruntime as ort

        from qbench.sdk import package_version

        # From the module, not the metadata: onnxruntime and onnxruntime-gpu
        # install the same package under two distribution names.
        build = "GPU" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPU"
        genai = package_version("onnxruntime-genai")
        return f"onnxruntime {ort.__version__} ({build} build); onnxruntime-genai {genai}"

    def for_device(self, config: OnnxConfig, device: str) -> OnnxConfig:
        # A graph is exported for one provider: resolved before the cache key is made.
        return config.model_copy(update={"target": device}) if config.target == "auto" else config

    def variant_available(self, config: OnnxConfig, device: str) -> Availability:
        base = self.available(device)
        if not base.ok:
            return base
        config = self.for_device(config, device)
        if config.target != device:
            return Availability.no(
                f"target={config.target}: the graph is exported for {config.target}, the run is on "
                f"{device} (leave target=auto)"
            )
        if device == "cpu" and config.precision == "fp16":
            return Availability.no(
                "precision=fp16 is for CUDA: ONNX Runtime's CPU provider has no fp16 kernels for most of the graph"
            )
        if device == "cuda" and (config.precision == "fp32" or config.activations == "dynamic"):
            # Seen with onnxruntime-genai 0.18.0: ORT refuses the graph ("This is an invalid model. Graph output
            # ... "), and quantize_dynamic names the present.* outputs as unknown tensors.
            return Availability.no(
                "onnxruntime-genai's builder writes an fp32 graph for CUDA whose present.* outputs "
                "no node produces: use onnx:fp16 as the unquantized CUDA row"
                + (" (int8-dyn quantizes that fp32 graph)" if config.activations == "dynamic" else "")
            )
        if device != "cuda":
            return base
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return Availability.no(
                "onnxruntime has no CUDA provider here: pip install onnxruntime-gpu (in place of onnxruntime)"
            )
        return base

    def quantize(self, model_path: Path, config: OnnxConfig, calibration, workdir: Path) -> dict[str, Any]:
        precision = "fp32" if config.activations == "dynamic" else config.precision
        options = []
        if precision != "fp32":
            options += [f"block_size={config.block_size}", f"is_symmetric={str(config.symmetric).lower()}"]
            if config.accuracy_level is not None:
                options.append(f"accuracy_level={config.accuracy_level}")
            if config.keep_lm_head:
                options.append("nodes_to_exclude=/lm_head/MatMul")
        if config.fuse_gate_up:
            options.append("fuse_mlp_gate_up=true")
        export(model_path, workdir, precision, config.target, options)
        meta: dict[str, Any] = {
            "exporter": "onnxruntime_genai.models.builder",
            "builder_precision": precision,
            "builder_execution_provider": config.target,
        }
        if config.activations == "dynamic":
            meta.update(quantize_dynamic_int8(workdir, config.keep_lm_head))
        meta["op_counts"] = {op: n for op, n in op_counts(workdir / MODEL_FILE).items() if op in QUANTIZED_OPS}
        return meta

    def load(self, artifact: Artifact, device: str) -> Session:
        config = OnnxConfig(**artifact.config)
        folder = Path(artifact.path)
        counts = op_counts(folder / MODEL_FILE)
        quantized = sum(n for op, n in counts.items() if op in QUANTIZED_OPS)
        if config.nominal_bits() is not None and not quantized:
            raise QBenchError(
                f"onnx:{artifact.variant}: the graph has no quantized MatMul "
                f"({', '.join(sorted(QUANTIZED_OPS))}): refusing to report fp32 numbers"
            )
        return OnnxSession(
            folder,
            device,
            {
                "quantized_matmuls": quantized,
                "op_counts": dict(counts),
                "kernel": "ONNX Runtime " + (", ".join(op for op in counts if op in QUANTIZED_OPS) or "MatMul (fp32)"),
            },
        )


def export(model_path: Path, out: Path, precision: str, target: str, options: list[str]) -> None:
    """Run the builder in a child process (it is a script, and prints a lot)."""
    cache = out.parent / "builder-cache"
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(model_path),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        target,
        "-c",
        str(cache),
    ]
    if options:
        command += ["--extra_options", *options]
    proc = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode or not (out / MODEL_FILE).is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise QBenchError(f"ONNX export failed ({' '.join(command[2:5])} ...): {last[:300]}")


def quantize_dynamic_int8(folder: Path, keep_lm_head: bool) -> dict[str, Any]:
    """int8 weights (per channel) and int8 activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = folder / MODEL_FILE
    target = folder / "model.int8.onnx"
    excluded = [n.name for n in _graph(source).graph.node if keep_lm_head and n.name.startswith("/lm_head/")]
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=excluded,
            use_external_data_format=True,
        )
    except Exception as exc:  # the quantizer's own error, named, not hidden
        raise QBenchError(
            f"onnxruntime.quantization.quantize_dynamic cannot handle the exported graph: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from None
    for leftover in (source, folder / "model.onnx.data"):
        leftover.unlink(missing_ok=True)
    # The graph keeps naming its external data file model.int8.onnx.data.
    target.rename(source)
    return {"dynamic_quantization": "onnxruntime.quantization.quantize_dynamic, QInt8 weights per channel"}


@hookimpl
def register_backends(register):
    register(OnnxRuntime())
