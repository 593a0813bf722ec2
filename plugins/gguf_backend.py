"""GGUF through llama.cpp (llama-cpp-python's bindings): the format and the
kernels that llama.cpp users ship.

The baseline is written to a float32 GGUF (``gguf_convert``), quantized by
llama.cpp's own ``llama_model_quantize`` to the chosen type (its per-tensor
policy included: a K-quant falls back to another type for rows whose length
is not a multiple of 256, and the types each tensor got are recorded), then
run by llama.cpp. A prequantized ``.gguf`` file is run as it is.

The session drives llama.cpp's C API directly (batches of token ids in,
float32 logits out): the harness tokenizes, windows and scores exactly as for
every other backend, so llama.cpp's tokenizer and sampler never touch a
measured figure. Note that on the CPU llama.cpp also quantizes activations
(to 8 bits) for its quantized dot products: that is part of what this row
measures, as it is part of what llama.cpp users run.
"""

from __future__ import annotations

import collections
import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from qbench.sdk import Artifact, Availability, Backend, QBenchError, Session, VariantConfig, hookimpl

MODEL_FILE = "model.gguf"

#: Types offered, as llama-quantize names them -> (llama_ftype suffix, the
#: ggml type of the bulk of the weights, whose bits per weight are promised).
TYPES: dict[str, tuple[str, str]] = {
    "f32": ("ALL_F32", "F32"),
    "f16": ("MOSTLY_F16", "F16"),
    "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
    "q6_k": ("MOSTLY_Q6_K", "Q6_K"),
    "q5_k_m": ("MOSTLY_Q5_K_M", "Q5_K"),
    "q5_0": ("MOSTLY_Q5_0", "Q5_0"),
    "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"),
    "q4_k_s": ("MOSTLY_Q4_K_S", "Q4_K"),
    "q4_0": ("MOSTLY_Q4_0", "Q4_0"),
    "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
    "iq4_xs": ("MOSTLY_IQ4_XS", "IQ4_XS"),
    "iq4_nl": ("MOSTLY_IQ4_NL", "IQ4_NL"),
    "q3_k_m": ("MOSTLY_Q3_K_M", "Q3_K"),
    "q2_k": ("MOSTLY_Q2_K", "Q2_K"),
}
#: The type llama.cpp's CPU kernels quantize a matmul's input to for each
#: weight type (ggml-cpu's ``vec_dot_type``): quantized weights multiply
#: 8-bit activations, accumulated in fp32.
CPU_ACTIVATION_TYPES = {
    "Q4_0": "q8_0",
    "Q5_0": "q8_0",
    "Q8_0": "q8_0",
    "IQ4_NL": "q8_0",
    "Q4_1": "q8_1",
    "Q5_1": "q8_1",
    "Q2_K": "q8_K",
    "Q3_K": "q8_K",
    "Q4_K": "q8_K",
    "Q5_K": "q8_K",
    "Q6_K": "q8_K",
    "IQ4_XS": "q8_K",
}
#: ``path=embedded``: the embedded default model's own file (Q4_1), as users download it.
EMBEDDED = "embedded"
#: ggml types that hold weights at full precision.
FULL_PRECISION = {"F32", "F16", "BF16", "F64"}


class GGUFConfig(VariantConfig):
    type: Optional[Literal[tuple(TYPES)]] = Field(  # type: ignore[valid-type]
        None, description="llama-quantize type: " + "|".join(TYPES)
    )
    path: Optional[str] = Field(
        None, description="prequantized: a .gguf file run as it is ('embedded': the default model's own Q4_1 file)"
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.type is None) == (self.path is None):
            raise ValueError("give either type=TYPE (quantize the baseline) or path=FILE.gguf (run a file as it is)")
        return self

    def nominal_bits(self) -> Optional[float]:
        if self.path is not None:  # known from the file only: load() checks its tensor types
            return None
        return bits_per_weight(TYPES[self.type][1])


def bits_per_weight(ggml_type: str) -> Optional[float]:
    import gguf

    if ggml_type in FULL_PRECISION:
        return None
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return size * 8 / block


class GGUFFile:
    """What qbench reads from a GGUF file's header (no tensor data is loaded)."""

    def __init__(self, path: Path):
        import gguf

        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # a truncated or foreign file: say which, not a numpy traceback
            raise QBenchError(
                f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}): pass a .gguf "
                "file written by llama.cpp or qbench"
            ) from None
        if "general.architecture" not in reader.fields:
            raise QBenchError(
                f"{path} is a GGUF file without general.architecture: it holds no model llama.cpp can "
                "load; pass a model .gguf file"
            )
        self.arch = str(reader.fields["general.architecture"].contents())
        self.meta = {
            k: f.contents() for k, f in reader.fields.items() if k.startswith(self.arch + ".") and len(f.data) == 1
        }
        tensors = {t.name: t for t in reader.tensors}
        self.tensor_bytes = sum(int(t.n_bytes) for t in tensors.values())
        self.embedding_bytes = int(tensors["token_embd.weight"].n_bytes) if "token_embd.weight" in tensors else 0
        self.has_output = "output.weight" in tensors
        self.types = collections.Counter(t.tensor_type.name for t in tensors.values() if len(t.shape) > 1)
        vocab = reader.fields.get("tokenizer.ggml.tokens")
        self.vocab_size = len(vocab.data) if vocab is not None else self.meta.get(f"{self.arch}.vocab_size")

    def quantized_tensors(self) -> int:
        return sum(n for t, n in self.types.items() if t not in FULL_PRECISION)

    def kv_bytes_per_position(self) -> Optional[int]:
        meta, a = self.meta, self.arch
        layers, heads = meta.get(f"{a}.block_count"), meta.get(f"{a}.attention.head_count")
        if not layers or not heads:
            return None
        kv_heads = meta.get(f"{a}.attention.head_count_kv", heads)
        key = meta.get(f"{a}.attention.key_length") or meta[f"{a}.embedding_length"] // heads
        value = meta.get(f"{a}.attention.value_length") or key
        return layers * kv_heads * (key + value) * 2  # llama.cpp's default cache type is f16


class LlamaLog:
    """llama.cpp's log, kept instead of printed: the worker's stderr stays
    readable, and a failure can quote llama.cpp's last error line."""

    def __init__(self):
        import llama_cpp

        self.lines: collections.deque[str] = collections.deque(maxlen=50)
        self._callback = llama_cpp.llama_log_callback(self._keep)  # referenced: ctypes must not free it
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

    def _keep(self, level: int, text: bytes, user_data) -> None:
        self.lines.append(text.decode("utf-8", "replace").rstrip())

    def last_error(self) -> str:
        lines = [line for line in self.lines if line]
        errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
        return (errors or lines or ["no message"])[-1][:300]


_LOG: Optional[LlamaLog] = None


def llama_log() -> LlamaLog:
    """The process's one LlamaLog: llama.cpp keeps calling the callback it
    was given, so that callback must live as long as the process."""
    global _LOG
    if _LOG is None:
        _LOG = LlamaLog()
    return _LOG


#: llama.cpp's KV cache types (``-ctk``/``-ctv``), qbench's name -> ggml type
#: id; ``full`` is llama.cpp's default, f16. A quantized V cache needs flash
#: attention, which the session then turns on for scoring and decoding.
GGUF_KV_TYPES = {"full": 1, "q8_0": 8, "q5_1": 7, "q5_0": 6, "q4_1": 3, "q4_0": 2, "iq4_nl": 20}
GGUF_KV_CACHES = {
    "full": "f16, llama.cpp's default",
    **{
        name: f"llama.cpp's {name} for keys and values (-ctk/-ctv {name}), flash attention on"
        for name in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
    },
}


def cpu_compute(file: GGUFFile) -> Optional[str]:
    """What the matmuls of a quantized file compute in on the CPU: 8-bit
    activations in the blocks llama.cpp pairs with its weight types (None
    for a file without quantized weights)."""
    partners = sorted({CPU_ACTIVATION_TYPES[t] for t in file.types if t in CPU_ACTIVATION_TYPES})
    return f"int8 activations ({', '.join(partners)} blocks), fp32 accumulation" if partners else None


class LlamaCppSession(Session):
    """A GGUF model in llama.cpp: logits for every position of a batch (one
    sequence id per row), and batched greedy decoding with its KV cache."""

    def __init__(self, path: Path, file: GGUFFile, device: str, facts: dict[str, Any]):
        import llama_cpp
        import torch

        self.log = llama_log()
        llama_cpp.llama_backend_init()
        system = llama_cpp.llama_print_system_info().decode().strip()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = -1 if device == "cuda" else 0
        notes = []
        if "AMX_INT8 = 1" in system:
            # llama.cpp's AMX matmul segfaults on quantized weights (llama.cpp
            # issue 20824; seen here on Sapphire Rapids). Its weights live in an
            # "extra" buffer type, which this switches off with the repacked ones.
            params.use_extra_bufts = False
            notes.append(
                "llama.cpp was built with AMX, whose matmul crashes (llama.cpp issue 20824): its AMX and "
                "repacked weight layouts are off, so speed may be below a build without AMX (see the "
                "README's gguf set-up)"
            )
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise QBenchError(f"llama.cpp cannot load {path}: {self.log.last_error()}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.file = file
        self.threads = torch.get_num_threads()  # the run's --threads, as the PyTorch backends use
        self.ctx = None
        self.kv_type = GGUF_KV_TYPES["full"]
        self.ctx_size = (0, 0, -2)  # (positions, sequences, flash attention) of the context
        # Decoding runs with flash attention off on the CPU, as
        # llama-cpp-python's Llama sets it: llama.cpp's "auto" turns it on
        # there, and it decodes slower on x86 CPUs (benchmarks/fidelity.py
        # shows it). Scoring keeps llama.cpp's choice, as
        # llama-perplexity does, so quality figures stay comparable with it.
        self.score_flash = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO  # llama-perplexity's choice
        self.decode_flash = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED if device == "cpu" else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        compute = cpu_compute(file) if device == "cpu" else None
        self.facts = {
            **facts,
            **({"compute_dtype": compute} if compute else {}),
            "threads": self.threads,
            "tensor_types": dict(self.file.types),
            "system_info": system,
            "flash_attention": (
                "llama.cpp's choice (auto) when scoring, off when decoding"
                if device == "cpu"
                else "llama.cpp's choice (auto)"
            ),
            "extra_buffer_types": bool(params.use_extra_bufts),
            "notes": notes,
        }

    def _context(self, positions: int, sequences: int, batch: int, flash: int = -1):
        """A context for ``sequences`` rows of ``positions`` tokens with
        flash attention ``flash`` (llama.cpp's type; -1: auto), reused
        (emptied) when big enough."""
        import llama_cpp

        if (
            self.ctx is not None
            and self.ctx_size[0] >= positions
            and self.ctx_size[1] >= sequences
            and self.ctx_size[2] == flash
            and llama_cpp.llama_n_batch(self.ctx) >= batch
        ):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
            return self.ctx
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
        params = llama_cpp.llama_context_default_params()
        # llama.cpp's default split cache: each row gets n_ctx / n_seq_max
        # cells of its own. (A unified cache with flash attention changed a
        # row's logits by up to 0.02 when another row shared its batch.)
        params.n_ctx = positions * sequences
        params.n_seq_max = sequences
        params.kv_unified = False
        params.n_batch = batch
        params.n_ubatch = min(batch, 512)
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = flash
        params.type_k = params.type_v = self.kv_type
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise QBenchError(
                f"llama.cpp cannot create a context of {positions} x {sequences} positions: {self.log.last_error()}"
            )
        self.ctx_size = (positions, sequences, flash)
        return self.ctx

    def _decode(self, ctx, rows: list[tuple[int, int, list[int]]], outputs: str):
        """Decode ``rows`` of (sequence id, first position, tokens) in one
        batch; ``outputs`` is ``all`` (logits for every token) or ``last``
        (each row's last token). Returns the logits, one row per output."""
        import llama_cpp
        import numpy as np

        total = sum(len(tokens) for _, _, tokens in rows)
        batch = llama_cpp.llama_batch_init(total, 0, 1)
        try:
            i = 0
            for seq, start, tokens in rows:
                for j, token in enumerate(tokens):
                    batch.token[i], batch.pos[i] = int(token), start + j
                    batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
                    batch.logits[i] = outputs == "all" or j == len(tokens) - 1
                    i += 1
            batch.n_tokens = total
            code = llama_cpp.llama_decode(ctx, batch)
            if code != 0:
                raise QBenchError(
                    f"llama.cpp's llama_decode failed (code {code}) on {total} tokens: {self.log.last_error()}"
                )
            produced = total if outputs == "all" else len(rows)
            logits = llama_cpp.llama_get_logits(ctx)  # waits for the device
            return np.ctypeslib.as_array(logits, shape=(produced, self.n_vocab)).copy()
        finally:
            llama_cpp.llama_batch_free(batch)

    def use_kv_cache(self, kind: str) -> Optional[str]:
        import llama_cpp

        if kind not in GGUF_KV_TYPES:
            return f"unknown KV cache '{kind}': choose one of {', '.join(GGUF_KV_TYPES)}"
        self.kv_type = GGUF_KV_TYPES[kind]
        if kind != "full":
            # llama.cpp quantizes V only under flash attention
            self.score_flash = self.decode_flash = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            self.facts["flash_attention"] = f"on (kv_cache={kind}: llama.cpp quantizes V only with it)"
            self.facts["kv_cache"] = GGUF_KV_CACHES[kind]
        if self.ctx is not None:  # the next context is made with the new types
            llama_cpp.llama_free(self.ctx)
            self.ctx, self.ctx_size = None, (0, 0, -2)
        return None

    def logits(self, input_ids, attention_mask):
        import torch

        lengths = attention_mask.sum(dim=1).tolist()
        rows = [(b, 0, input_ids[b, :n].tolist()) for b, n in enumerate(lengths)]
        ctx = self._context(input_ids.shape[1], len(rows), sum(lengths), self.score_flash)
        flat = torch.from_numpy(self._decode(ctx, rows, "all"))
        out = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.n_vocab)
        for (b, _, tokens), piece in zip(rows, flat.split(lengths)):
            out[b, : len(tokens)] = piece
        return out

    def generate(self, input_ids, max_new_tokens: int, on_token: Callable[..., None]):
        import torch

        batch, prompt = input_ids.shape
        ctx = self._context(prompt + max_new_tokens, batch, batch * prompt, self.decode_flash)
        rows = [(b, 0, input_ids[b].tolist()) for b in range(batch)]
        produced = []
        for step in range(max_new_tokens):
            nxt = self._decode(ctx, rows, "last").argmax(axis=-1)
            on_token()  # llama_get_logits returned: the step is done
            produced.append(torch.from_numpy(nxt).long())
            rows = [(b, prompt + step, [int(nxt[b])]) for b in range(batch)]
        return torch.stack(produced, dim=1)

    def weight_bytes(self) -> int:
        return self.file.tensor_bytes

    def unread_weight_bytes(self) -> int:
        # With a separate output head, a step reads one row of the embedding table.
        return self.file.embedding_bytes if self.file.has_output else 0

    def kv_bytes_per_position(self) -> Optional[int]:
        f16 = self.file.kv_bytes_per_position()
        # ggml's block sizes: bytes per 32 values (f16: 64)
        per_block = {1: 64, 8: 34, 7: 24, 6: 22, 3: 20, 2: 18, 20: 18}[self.kv_type]
        return None if f16 is None else round(f16 * per_block / 64)

    def use_runtime(self, runtime: str, compile_mode: str = "max-autotune") -> Optional[str]:
        if runtime == "eager":
            return None
        return (
            f"runtime={runtime} is a PyTorch runtime; llama.cpp runs its own compute graph (its speed is this "
            "backend's eager row)"
        )

    def describe(self) -> dict[str, Any]:
        return self.facts

    def close(self) -> None:
        import llama_cpp

        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def resolve_file(path: str) -> Path:
    """A prequantized file's path, ``embedded`` being the default model's own."""
    if path == EMBEDDED:
        from qbench.sdk import embedded_gguf

        return embedded_gguf()
    file = Path(path).expanduser()
    if not file.is_file():
        raise QBenchError(f"GGUF file '{path}' not found: pass the path of a .gguf file (or path=embedded)")
    return file


class LlamaCpp(Backend):
    name = "gguf"
    description = "GGUF via llama.cpp (llama-cpp-python): llama-quantize types (Q8_0 ... Q2_K, IQ4_XS) or a .gguf file"
    config_class = GGUFConfig
    requires = {"llama_cpp": "llama-cpp-python", "gguf": "gguf"}
    extra = "gguf"
    versions_of = ("llama-cpp-python", "gguf")
    kv_caches = GGUF_KV_CACHES

    def variants(self) -> dict[str, VariantConfig]:
        named = {t: GGUFConfig(type=t) for t in ("q8_0", "q6_k", "q4_k_m", "q4_0", "iq4_xs", "f32")}
        return {**named, "embedded": GGUFConfig(path=EMBEDDED), "prequantized": GGUFConfig(path="")}

    def variant_available(self, config: GGUFConfig, device: str) -> Availability:
        if config.path == "":
            return Availability.no("needs the file: -b gguf:prequantized:path=FILE.gguf")
        base = self.available(device)
        if base.ok and device == "cuda":
            import llama_cpp

            if not llama_cpp.llama_supports_gpu_offload():
                return Availability.no(
                    "llama-cpp-python here is built for the CPU only: CMAKE_ARGS=-DGGML_CUDA=on "
                    "pip install --force-reinstall --no-cache-dir llama-cpp-python"
                )
        return base

    def default_skip_reason(self, config: GGUFConfig, device: str) -> Optional[str]:
        if config.path is None and config.type in ("q8_0", "q4_k_m"):
            return None
        return "run by name: one 8-bit and one 4-bit llama.cpp row by default, to keep the default run short"

    def cache_inputs(self, config: GGUFConfig) -> Optional[str]:
        """A prequantized file is read in place: its content is part of the key."""
        if not config.path:
            return None
        from qbench.sdk import file_digest

        return file_digest(resolve_file(config.path))[:16]

    def check_inputs(self, config: GGUFConfig, model_path: Path) -> None:
        if config.path:
            _check_prequantized(Path(model_path), config)

    def quantize(self, model_path: Path, config: GGUFConfig, calibration, workdir: Path) -> dict[str, Any]:
        if config.path is not None:
            return _check_prequantized(model_path, config)
        from qbench_plugins.gguf_convert import convert_llama

        full = workdir / ("model-f32.gguf" if config.type != "f32" else MODEL_FILE)
        facts = convert_llama(model_path, full)
        if config.type != "f32":
            _llama_quantize(full, workdir / MODEL_FILE, config.type)
            full.unlink()
        facts["tensor_types"] = dict(GGUFFile(workdir / MODEL_FILE).types)
        return facts

    def load(self, artifact: Artifact, device: str) -> Session:
        config = GGUFConfig(**artifact.config)
        path = resolve_file(config.path) if config.path else Path(artifact.path) / MODEL_FILE
        file = GGUFFile(path)
        if (config.path is not None or config.type not in ("f32", "f16", "bf16")) and not file.quantized_tensors():
            raise QBenchError(
                f"gguf:{artifact.variant}: {path.name} holds no quantized tensors "
                f"({dict(file.types)}): refusing to report full-precision numbers"
            )
        from qbench.sdk import package_version

        kernel = f"llama.cpp (llama-cpp-python {package_version('llama-cpp-python')}), {device.upper()}"
        return LlamaCppSession(path, file, device, {"kernel": kernel, "file": str(path)})


def _llama_quantize(source: Path, target: Path, type_name: str) -> None:
    import llama_cpp
    import torch

    log = llama_log()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + TYPES[type_name][0])
    params.nthread = torch.get_num_threads()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0 or not target.is_file():
        raise QBenchError(f"llama.cpp could not quantize to {type_name} (code {code}): {log.last_error()}")


def _check_prequantized(model_path: Path, config: GGUFConfig) -> dict[str, Any]:
    import json

    path = resolve_file(config.path)
    file = GGUFFile(path)
    from qbench.sdk import embedded_source

    # the embedded model's folder names the file it came from
    from_this_file = (embedded_source(model_path) or {}).get("gguf") == path.name
    if config.path == EMBEDDED and not from_this_file:
        raise QBenchError(
            f"gguf:embedded is the embedded default model's own file, not a quantization of "
            f"{model_path.name}: run it with the default model, or pass "
            "-b gguf:prequantized:path=FILE.gguf"
        )
    ours = json.loads((model_path / "config.json").read_text()).get("vocab_size")
    if file.vocab_size != ours:
        raise QBenchError(
            f"GGUF file {path} has a vocabulary of {file.vocab_size} tokens, the run's model {ours}: "
            "it is not a quantization of this model; pass --model its base model"
        )
    if from_this_file:
        notes = [
            "the baseline is this very file dequantized to fp32: the row measures llama.cpp's kernels alone "
            "(on the CPU they quantize activations to 8 bits in quantized dot products)"
        ]
    else:
        notes = [
            "prequantized file benchmarked as it is: fidelity is measured against this run's baseline model, "
            "which may not be the exact weights it was quantized from"
        ]
    return {"file": str(path), "architecture": file.arch, "tensor_types": dict(file.types), "notes": notes}


@hookimpl
def register_backends(register):
    register(LlamaCpp())
