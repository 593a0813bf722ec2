"""A Session over a transformers causal LM, shared by the transformers-based
backends (full precision, bitsandbytes, torchao, GPTQ). Not backend-specific:
it only runs forward passes."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from qbench.core.errors import QBenchError
from qbench.sdk.backend import Session, to_device
from qbench.sdk.kv import HF_KV_CACHES, HF_QUANTIZED_KV, KV_GROUP


def unique_tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, counting shared storage (tied
    embeddings) once. Quantized tensor subclasses (torchao) keep their packed
    data in inner tensors, and bitsandbytes keeps scales beside the weight
    (``SCB``, ``quant_state.absmax``...): both are counted."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        for t in _leaf_tensors(tensor):
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in seen or t.device.type == "meta":
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def _leaf_tensors(tensor: torch.Tensor, depth: int = 0):
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.nn.Parameter:
        names, _ = flatten()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):
                yield from _leaf_tensors(inner, depth + 1)
    else:
        yield tensor
    # Scales and codebooks hung on the tensor object as attributes
    # (bitsandbytes' Int8Params.SCB, Params4bit.quant_state and its nested
    # state for double quantization).
    if depth == 0:
        yield from _attribute_tensors(getattr(tensor, "__dict__", {}), 0)


def _attribute_tensors(attrs: dict, depth: int):
    for value in attrs.values():
        if isinstance(value, torch.Tensor):
            # flattened too: a wrapper subclass (quanto's PackedTensor) has no storage of its own
            yield from _leaf_tensors(value, 1)
        elif depth < 2 and hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
            yield from _attribute_tensors(vars(value), depth + 1)


def linear_layers(model: torch.nn.Module, keep: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` layers to quantize: all but those whose qualified
    name, or its last component, matches one of the ``keep`` patterns
    (fnmatch syntax; ``lm_head`` or ``*.down_proj``)."""
    from fnmatch import fnmatchcase

    chosen = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if any(fnmatchcase(name, pat) or fnmatchcase(name.rsplit(".", 1)[-1], pat) for pat in keep):
            continue
        chosen[name] = mod
    return chosen


def replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put ``module`` where the submodule called ``name`` is (a quantized layer for a linear one)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def meta_skeleton(model_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's structure on the meta device: shapes and names, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def planned_layers(
    model_path: str, keep: tuple[str, ...], trust_remote_code: bool = False
) -> tuple[list[str], list[str]]:
    """(layers to quantize, linear layers kept), from the model's structure alone."""
    skeleton = meta_skeleton(model_path, trust_remote_code)
    chosen = list(linear_layers(skeleton, keep))
    kept = sorted(set(linear_layers(skeleton, ())) - set(chosen))
    return chosen, kept


def require_quantized_layers(model: torch.nn.Module, expected: list[str], is_quantized, what: str) -> None:
    """After loading, check that each layer meant to be quantized really is
    (``is_quantized(module)``); a silent fallback to full precision must not
    produce a row."""
    from qbench.core.errors import QBenchError

    missing = [name for name in expected if not is_quantized(model.get_submodule(name))]
    if missing or not expected:
        raise QBenchError(
            f"{what}: {len(missing)} of {len(expected)} layers meant to be quantized are not "
            f"(first: {missing[0] if missing else 'no layers selected'}); refusing to report "
            "full-precision numbers as quantized ones"
        )


def unique_state_dict(model) -> dict:
    """state_dict without the second name of tied tensors (safetensors refuses
    shared storage; ``tie_weights`` restores the tie after loading)."""
    seen, state = set(), {}
    for key, value in model.state_dict().items():
        if type(value) is torch.Tensor:
            ptr = value.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
        state[key] = value
    return state


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)


class CompiledDecoder:
    """The compiled runtime: gpt-fast's recipe on a transformers model. A
    static KV cache allocated once per workload shape (and zeroed between
    calls), the prefill eager, each decode step one ``torch.compile`` call,
    and the whole step (compiled regions, any kernel a backend launches from
    Python between them, the token fed back and the position advanced)
    captured once as one CUDA graph and replayed for every token, as vLLM
    and SGLang capture their decode steps.

    Why the whole step and not inductor's own CUDA graphs
    (``mode="reduce-overhead"``): inductor graphs only what it compiled. A
    backend whose kernels dynamo cannot trace (gemlite's Triton GEMVs, launched
    through their own autotuner) splits the step into regions, and between
    them the host launches each kernel from Python: the step then takes far
    longer than its kernels, slower than bf16. So inductor compiles without CUDA graphs
    (``max-autotune`` becomes ``max-autotune-no-cudagraphs``,
    ``reduce-overhead`` becomes ``default``) and this class captures.

    Inductor's coordinate-descent tuning of its own kernels is on in both
    modes, as gpt-fast and torchao set it: with it, inductor turns a
    one-row matmul into a reduction kernel that fuses the weight's
    dequantization (an int8 weight read as int8), where without it cuBLAS
    reads a dequantized copy of every weight each step. ``max-autotune``
    (torchao's benchmarks) adds a benchmarked choice among cuBLAS and Triton
    kernels for each matmul shape; ``reduce-overhead`` (gpt-fast's) keeps
    inductor's defaults and compiles sooner.

    The host queues the steps without waiting for each, as gpt-fast's and
    torchao's benchmarks do: a CUDA event after each step times it on the
    device, and the steps' completion times are handed to ``on_token`` once
    the last one is done. Waiting for every step would add the host's own
    per-step work (graph launch) to each token's time: with the device idle
    meanwhile, that measures the host, not the kernels."""

    INDUCTOR_MODES = {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "default"}

    def __init__(self, model: torch.nn.Module, device: str, mode: str = "max-autotune", pipelined: bool = True):
        import torch._inductor.config

        # A process-wide setting; a cell's worker process is its own.
        torch._inductor.config.coordinate_descent_tuning = True
        # a transformers causal LM: its config and generation attributes are not torch.nn.Module's
        self.model: Any = model
        self.device, self.pipelined = device, pipelined
        self.cache: Any = None
        self.shape: tuple[int, int] = (0, 0)
        self.graph: torch.cuda.CUDAGraph | None = None
        # the graph's input buffers, fed back by the graph itself
        self.token: Any = None
        self.position: Any = None
        self.cache_kw = cache_argument(model)
        self.step = torch.compile(self._decode, mode=self.INDUCTOR_MODES[mode], dynamic=False)

    def _decode(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids, **{self.cache_kw: self.cache}, cache_position=position, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def _prepare(self, shape: tuple[int, int]) -> None:
        """A zeroed static cache of this shape, and the step captured for it.
        The cache's tensors are allocated by the warm-up steps (transformers
        allocates them at first use) and only zeroed afterwards, so the
        addresses the graph recorded stay valid."""
        from transformers import StaticCache

        if self.graph is not None and shape == self.shape:
            self.cache.reset()
            return
        self.graph = None
        self.cache, self.shape = StaticCache(config=self.model.config, max_cache_len=shape[1]), shape
        self.token = torch.zeros((shape[0], 1), dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        # One eager step first, as gpt-fast's eager prefill does: transformers
        # allocates the cache's tensors at their first use. Traced instead,
        # that allocation is compiled into the first graph, and the second
        # step, now with an allocated cache, compiles the step again: two
        # compilations per shape, the slowest part of a compiled cell.
        self._decode(self.token, self.position)
        # Compiling and every backend's own autotuning happen in these
        # warm-up steps, on a side stream as CUDA graph capture requires.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step(self.token, self.position)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.token.copy_(self.step(self.token, self.position))
            self.position.add_(1)
        problem = self._capture_differs(graph)
        self.cache.reset()
        if problem:
            raise QBenchError(problem)
        self.graph = graph

    def _capture_differs(self, graph: Any) -> str | None:
        """Whether the compiled, captured step computes the model's step. Two
        ways it can fail while timing well: the compiler mistraces a backend's
        kernel, so every compiled call computes something else than the eager
        step (docs/gpu.md: compiled GPTQ on CUDA); or a kernel runs where the
        capture cannot see it (another stream, a result cached on the host),
        so it ran once while capturing and every replay hands on that one
        step's results. The step is run three ways from a zeroed cache, at a token
        and position unlike the capture's: eager, as a plain compiled call,
        and as a replay. What each writes into the cache is compared. The
        replay with the call: every layer's keys and values (so nearly all of
        the step's work), within rounding, as the same kernels run. The call
        with the eager step: the first layers' keys and values, which the
        step's first matmuls compute (a quantized backend's kernels among
        them) before compiled kernels' other rounding has grown with depth.
        Only the first positions are copied, where the step writes
        (transformers 5.17 writes at the position passed, 5.25 at its own
        count from zero), so the copies stay small at any batch size."""
        written = {}
        for run in ("eager", "call", "replay"):
            self.cache.reset()
            self.token.fill_(self.model.config.get_text_config().vocab_size // 2)
            self.position.fill_(PROBE_POSITION)
            if run == "eager":
                self._decode(self.token, self.position)
            elif run == "call":
                self.step(self.token, self.position)
            else:
                graph.replay()
            if self.device == "cuda":
                torch.cuda.synchronize()
            written[run] = [
                torch.cat([t[:, :, : PROBE_POSITION + 1].to(torch.float32, copy=True).flatten() for t in kv])
                for kv in ((layer.keys, layer.values) for layer in self.cache.layers)
            ]
        self.token.zero_()
        self.position.zero_()
        first = slice(0, COMPILE_CHECK_LAYERS)
        compiled = _relative_gap(torch.cat(written["call"][first]), torch.cat(written["eager"][first]))
        if compiled > COMPILE_TOLERANCE:
            return (
                f"runtime=compiled: the compiled decode step computes another step than the eager model (the KV "
                f"cache it writes is {compiled:.2g} away from the eager step's, relative): the compiler mistraces "
                f"this backend's kernels, so its timing would not be this model's decode; use runtime=eager for "
                f"this row"
            )
        replayed = _relative_gap(torch.cat(written["replay"]), torch.cat(written["call"]))
        if replayed > REPLAY_TOLERANCE:
            return (
                f"runtime=compiled: the decode step's CUDA graph does not redo the step's work (the KV cache a "
                f"replay writes is {replayed:.2g} away from a plain call's, relative): a kernel of this backend "
                f"runs outside the capture, so its timing would not be a decode; use runtime=eager for this row"
            )
        return None

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, on_token: Callable[..., None]) -> torch.Tensor:
        ids = input_ids.to(self.device)
        batch, length = ids.shape
        self._prepare((batch, length + max_new_tokens))
        torch.cuda.synchronize()
        # The device's clock, anchored to the host's while the device is idle.
        began, origin = time.perf_counter(), torch.cuda.Event(enable_timing=True)
        origin.record()
        events = []
        out = self.model(
            input_ids=ids,
            **{self.cache_kw: self.cache},
            cache_position=torch.arange(length, device=self.device),
            use_cache=True,
            logits_to_keep=1,
        )
        self.token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.position.fill_(length)
        produced = [self.token.clone()]
        for index in range(max_new_tokens):
            if self.pipelined:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            else:
                torch.cuda.synchronize()
                on_token()
            if index == max_new_tokens - 1:
                break
            self.graph.replay()
            produced.append(self.token.clone())
        torch.cuda.synchronize()
        for event in events:
            on_token(began + origin.elapsed_time(event) / 1e3)
        return torch.cat(produced, dim=1).cpu()


#: How far a replay of the captured decode step may write another KV cache
#: than a plain call of the same compiled step (relative L2): the same
#: kernels agree to rounding, or to a split reduction's order.
REPLAY_TOLERANCE = 1e-2
#: How far the compiled step may write other keys and values than the eager
#: step in its first layers (relative L2), and how many layers: inductor's
#: fused kernels round in other places, a gap that grows with depth. SmolLM2-135M
#: in bf16 on a CPU: 0.004 in layers 0 and 1 (0.006 with torchao's int8 or
#: int4 weight-only layers), up to 0.06 deeper; the step fed another token
#: instead: 0.5 in layers 0 and 1, down to 0.01 deeper.
COMPILE_TOLERANCE = 0.05
COMPILE_CHECK_LAYERS = 2


def _relative_gap(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 distance. Equal values count as equal even where not
    finite (a NaN both runs write is the model's, not the runtime's); a value
    only one run writes is not: it makes the gap infinite."""
    same = (got == want) | (got.isnan() & want.isnan())
    gap = torch.where(same, 0.0, got - want)
    value = (gap.norm() / torch.where(want.isfinite(), want, 0.0).norm().clamp_min(1e-12)).item()
    return value if math.isfinite(value) else math.inf


#: The position the check decodes at: not the capture's (0), so a replay
#: that repeats the capture's step computes other keys and values.
PROBE_POSITION = 1


#: The library each quantized cache needs, and the qbench extra that installs it.
_KV_LIBRARIES = {"hqq": ("hqq", "hqq"), "quanto": ("optimum.quanto", "quanto")}
#: Tokens per forward pass when scoring through a quantized cache: the
#: cache's residual window, so the positions held in full precision are the
#: ones decoding would hold (see ``HFSession.logits``).
KV_SCORING_CHUNK = 128


def cache_argument(model: Any) -> str:
    """The keyword a model's forward takes its KV cache by: transformers 5.25
    renamed ``past_key_values`` to ``cache`` (the old name warns on every
    call and goes in 5.40); earlier releases know only ``past_key_values``."""
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError, AttributeError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The cache a forward pass returns, under either release's name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class HFSession(Session):
    def __init__(self, model: torch.nn.Module, device: str, facts: dict[str, Any] | None = None):
        self.model: Any = model.eval()  # a transformers causal LM (see CompiledDecoder)
        self.device = device
        self.facts = facts or {}
        self.decoder: CompiledDecoder | None = None
        self.kv_cache = "full"
        #: the GPUs holding the model's layers (several when spread with --gpus-per-cell)
        held = {t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"}
        self.gpus = sorted(held) or ([torch.cuda.current_device()] if device == "cuda" else [])

    def use_kv_cache(self, kind: str) -> str | None:
        if kind == "full":
            self.kv_cache = kind
            return None
        if kind not in HF_QUANTIZED_KV:
            return f"unknown KV cache '{kind}': choose one of {', '.join(HF_KV_CACHES)}"
        library = HF_QUANTIZED_KV[kind][0]
        if library in _KV_LIBRARIES:
            import importlib.util

            module, extra = _KV_LIBRARIES[library]
            if importlib.util.find_spec(module.split(".")[0]) is None:
                return f"kv_cache={kind} needs {module}: pip install 'qbench[{extra}]'"
        self.kv_cache = kind
        self.facts["kv_cache"] = HF_KV_CACHES[kind]
        self.facts["kv_scoring"] = (
            f"chunks of {KV_SCORING_CHUNK} tokens through the quantized cache: each token attends to the "
            "quantized cache of earlier chunks and to its own chunk in full precision, as decoding after a "
            f"{KV_SCORING_CHUNK}-token prompt does"
        )
        return None

    def new_cache(self) -> Any:
        """A fresh KV cache of this session's kind (None: transformers' own)."""
        if self.kv_cache == "full":
            return None
        from transformers import QuantizedCache

        library, bits = HF_QUANTIZED_KV[self.kv_cache]
        return (
            QuantizedCache(library, self.model.config, nbits=bits)
            if bits
            else QuantizedCache(library, self.model.config)
        )

    def use_runtime(self, runtime: str, compile_mode: str = "max-autotune") -> str | None:
        if runtime == "eager":
            self.decoder = None
            return None
        if runtime == "compiled":
            if self.kv_cache != "full":
                return (
                    f"runtime=compiled replays a static KV cache, and transformers' quantized caches grow as "
                    f"they go: use runtime=eager for kv_cache={self.kv_cache}"
                )
            if self.device != "cuda":
                return "runtime=compiled needs CUDA: its decode step replays as a CUDA graph"
            if len(self.gpus) > 1:
                return (
                    f"runtime=compiled captures one GPU's decode step, and this model is spread over "
                    f"{len(self.gpus)} GPUs: use runtime=eager with --gpus-per-cell"
                )
            self.decoder = CompiledDecoder(self.model, self.device, mode=compile_mode)
            return None
        return super().use_runtime(runtime, compile_mode)

    def _sync(self) -> None:
        # every GPU holding layers: a step ends on the last one
        for gpu in self.gpus:
            torch.cuda.synchronize(gpu)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # No mask, as lm-eval's HF model: padding is on the right, so in a
        # causal model no real position attends to it and the mask changes
        # no logit the harness reads. Without one, attention takes its causal
        # kernel (flash on a GPU), and transformers skips building a mask and
        # the host synchronisation that checks it for padding.
        del attention_mask
        ids = to_device(input_ids, torch.device(self.device))
        if self.kv_cache == "full":
            return self.model(input_ids=ids, use_cache=False).logits
        # Through the quantized cache, KV_SCORING_CHUNK tokens at a time: one
        # pass over the whole window would attend to the keys it was given,
        # never to what the cache stores.
        cache = self.new_cache()
        pieces = []
        keyword = cache_argument(self.model)
        for start in range(0, ids.shape[1], KV_SCORING_CHUNK):
            out = self.model(input_ids=ids[:, start : start + KV_SCORING_CHUNK], **{keyword: cache}, use_cache=True)
            pieces.append(out.logits)
        self.kv_measured = (cache_bytes(cache), ids.shape[0] * ids.shape[1])
        return torch.cat(pieces, dim=1)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, on_token: Callable[..., None]) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.generate(input_ids, max_new_tokens, on_token)
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids)
        # Our own greedy loop rather than model.generate(): EOS can never stop
        # it, and each step is timed the same way for every backend.
        keyword = cache_argument(self.model)
        out = self.model(
            input_ids=ids, attention_mask=mask, **{keyword: self.new_cache()}, use_cache=True, logits_to_keep=1
        )
        past = returned_cache(out)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        self._sync()
        on_token()
        produced = [step]
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            out = self.model(input_ids=step, attention_mask=mask, **{keyword: past}, use_cache=True, logits_to_keep=1)
            past = returned_cache(out)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            self._sync()
            on_token()
            produced.append(step)
        return torch.cat(produced, dim=1).cpu()

    def weight_bytes(self) -> int:
        return unique_tensor_bytes(self.model)

    def unread_weight_bytes(self) -> int:
        embedding, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if embedding is None:
            return 0
        if (
            head is not None
            and head.weight.untyped_storage().data_ptr() == embedding.weight.untyped_storage().data_ptr()
        ):
            return 0  # tied: the output head reads the whole table every step
        return unique_tensor_bytes(embedding)

    def kv_bytes_per_position(self) -> int | None:
        config = getattr(self.model.config, "text_config", None) or self.model.config
        layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
        if not layers or not heads:
            return None
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        # The cache holds keys and values in the dtype activations run in.
        dtype = self.model.get_input_embeddings().weight.dtype
        size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        elements = 2 * layers * kv_heads * head_dim
        if self.kv_cache == "full":
            return elements * size
        bits = HF_QUANTIZED_KV[self.kv_cache][1]
        if bits is None:  # fp8: a byte each (the per-layer scales are negligible)
            return elements
        # n bits each, and a scale and a zero point in the activation dtype per group of
        # KV_GROUP values; the newest positions' full-precision residual is not counted here
        return round(elements * (bits / 8 + 2 * size / KV_GROUP))

    def kv_measured_bytes_per_position(self) -> float | None:
        """What the last scoring pass's quantized cache held per position
        (residual included), or None where it was not measured."""
        measured = getattr(self, "kv_measured", None)
        return measured[0] / measured[1] if measured and measured[1] else None

    def describe(self) -> dict[str, Any]:
        types: dict[str, int] = {}
        for module in self.model.modules():
            if not list(module.children()):
                name = type(module).__name__
                types[name] = types.get(name, 0) + 1
        dtypes: dict[str, int] = {}
        for p in self.model.parameters():
            dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + p.numel()
        return {"leaf_module_types": types, "parameter_dtypes": dtypes, **self.facts}


def cache_bytes(cache: Any) -> int:
    """Bytes a transformers KV cache holds: every tensor reachable from its
    layers (quantized states and their scales, the full-precision residual),
    shared storage once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def walk(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            for t in _leaf_tensors(value):
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    for layer in getattr(cache, "layers", []):
        walk(vars(layer))
    return total


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS first by itself (llama.cpp's add_bos)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types, with multi-paragraph messages
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise QBenchError(
            f"cannot load a tokenizer from {model_path} ({type(exc).__name__}: {first}): the model "
            "folder needs its tokenizer files (tokenizer.json, or tokenizer.model with "
            "tokenizer_config.json)"
        ) from None
