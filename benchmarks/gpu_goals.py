"""Decode speed of several rows side by side in one process on a GPU: batch-1
greedy decode of a Llama-shaped model with random weights (speed and memory
are real, quality means nothing), every row through qbench's own session and
runtimes, and transformers' ``generate`` with a static cache as the eager
reference. Prints each row's ms/token, bytes read per step, and share of the
copy-benchmark peak, then each row's speed against bf16 compiled.

    python benchmarks/gpu_goals.py                         # 1.07B shape
    python benchmarks/gpu_goals.py --shape 8b              # Llama-3-8B widths, SmolLM2's vocabulary
    python benchmarks/gpu_goals.py --rows bf16-compiled,int4-gemlite-g128 --mode max-autotune

A row is ``bf16-eager``, ``hf-generate-eager``, ``bf16-compiled``, any
torchao variant of qbench's, settings included (``int4-gemlite-g128``, ``int8-wo``,
``int8-wo:compute_dtype=fp32`` ...; computing as on a cell's GPU), or
``bnb-nf4`` / ``bnb-fp4`` (bitsandbytes 4-bit, bf16 compute), or
``onnx-int4`` / ``onnx-int8`` / ``onnx-fp16`` (qbench's ``onnx`` backend:
the random model saved, exported by onnxruntime-genai's builder for CUDA and
run by ONNX Runtime's CUDA provider, compiled as ONNX Runtime's CUDA graphs
over a fixed-size cache; ``+eager`` runs it eager, and ``+key=value`` sets
the variant, e.g. ``onnx-int4+block_size=128+keep_lm_head=false``: needs
onnxruntime-gpu and ``--tokenizer-from``), or
``gptq-marlin`` (gptqmodel's Marlin kernel, 4-bit g128, bf16 compute, on
random packed weights: GPTQ's calibration changes the values, not the
kernel's speed; the kernel is compiled on first use, minutes), or
``fbgemm-int4`` (FBGEMM GenAI's int4 x bf16 GEMM, g128 with zero points, the
kernel torchao's preshuffled int4 layout calls through mslk: needs
fbgemm-gpu-genai); every row but
the first two (and ``+eager`` onnx rows) decodes through its compiled runtime. A gemlite row may name
how gemlite picks its Triton kernel configurations: ``int4-gemlite-g128``
(gemlite's own choice: the tuned table shipped for this GPU if its name
matches one, else a short autotune), ``int4-gemlite-g128+h100`` (the table
gemlite ships for the H100, another Hopper GPU) or ``int4-gemlite-g128+max``
(gemlite's exhaustive autotune, about 20 s per matrix shape).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qbench.core.errors import QBenchError

SHAPES = {  # hidden, layers, heads, kv heads, MLP; vocabulary 49152 (SmolLM2's tokenizer)
    "1b": (2048, 16, 32, 8, 8192),
    "3b": (3072, 28, 24, 8, 8192),
    "8b": (4096, 32, 32, 8, 14336),
}
ROWS = ("bf16-eager", "hf-generate-eager", "bf16-compiled", "int4-tinygemm-g128", "int4-gemlite-g128",
        "int8-gemlite", "bnb-nf4", "gptq-marlin")
#: By name only: they need onnxruntime-gpu and --tokenizer-from.
ONNX_ROWS = ("onnx-int4", "onnx-int8", "onnx-fp16")
#: By name only: needs fbgemm-gpu-genai.
FBGEMM_ROWS = ("fbgemm-int4",)


def build(shape: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, mlp = SHAPES[shape]
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def configure_gemlite(choice: str) -> None:
    """Set how gemlite picks kernel configurations for the rows that follow."""
    from pathlib import Path

    import gemlite
    from gemlite.core import GemLiteLinear, get_default_cache_config

    GemLiteLinear.reset_config()
    gemlite.set_autotune("max" if choice == "max" else "fast")
    if choice == "max":
        return
    table = str(Path(gemlite.__file__).parent / "configs" / f"{choice}.json") if choice else get_default_cache_config()
    if table:
        print(f"  gemlite kernel table: {table}", flush=True)
        if not GemLiteLinear.load_config(table):
            raise SystemExit(f"gemlite has no table {table}")


def quantized(shape: str, variant: str):
    """A fresh model quantized the way qbench's torchao backend does it."""
    from torchao.quantization import FqnToConfig, quantize_

    from qbench.sdk.hf import linear_layers
    from qbench_plugins.torchao_ptq import TorchAO, compute_dtype, layer_config

    backend = TorchAO()
    config = backend.for_device(backend.parse_variant(variant)[1], "cuda")  # as a cell's worker does
    model = build(shape, compute_dtype(config))
    layers = linear_layers(model, config.keep)
    quantize_(model, FqnToConfig({name: layer_config(config, layer.in_features)[0]
                                  for name, layer in layers.items()}), filter_fn=None)
    return model


def bnb_quantized(shape: str, quant_type: str):
    """A fresh bf16 model with its linear layers (lm_head kept) swapped for
    bitsandbytes' 4-bit ones, as transformers' ``BitsAndBytesConfig`` would
    build them, computing in bf16."""
    import bitsandbytes as bnb

    from qbench.sdk.hf import linear_layers

    model = build(shape)
    for name, layer in linear_layers(model, ("lm_head",)).items():
        parent, _, child = name.rpartition(".")
        four = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                 compute_dtype=torch.bfloat16, quant_type=quant_type, device="cuda")
        four.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type=quant_type).to("cuda")
        setattr(model.get_submodule(parent), child, four)
    return model


class FbgemmInt4Linear(torch.nn.Module):
    """A linear layer on FBGEMM GenAI's int4 x bf16 mixed-input GEMM
    (``bf16i4bf16_shuffled``, the kernel torchao's preshuffled int4 layout
    calls through mslk): weights in groups of 128 with zero points."""

    def __init__(self, layer: torch.nn.Linear):
        from fbgemm_gpu.experimental.gen_ai.quantize import quantize_int4_preshuffle

        super().__init__()
        self.out_features = layer.out_features
        wq, (scale, zero) = quantize_int4_preshuffle(layer.weight.data, group_size=128, dtype="bf16")
        self.register_buffer("wq", wq)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, x):
        out = torch.ops.fbgemm.bf16i4bf16_shuffled(x.reshape(-1, x.shape[-1]), self.wq, self.scale, self.zero)
        return out.reshape(*x.shape[:-1], self.out_features)


def fbgemm_quantized(shape: str):
    """A fresh bf16 model with every linear layer but the head on FBGEMM GenAI's int4 kernel."""
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm's GenAI kernels)

    from qbench.sdk.hf import linear_layers

    model = build(shape)
    for name, layer in linear_layers(model, ("lm_head",)).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FbgemmInt4Linear(layer))
    torch.cuda.empty_cache()
    return model


def marlin_quantized(shape: str, group_size: int = 128):
    """A fresh bf16 model with its linear layers (lm_head kept) swapped for
    gptqmodel's Marlin layers holding random 4-bit weights and scales, packed
    and permuted by gptqmodel's own ``post_init``."""
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    from qbench.sdk.hf import linear_layers

    model = build(shape)
    for name, layer in linear_layers(model, ("lm_head",)).items():
        parent, _, child = name.rpartition(".")
        four = MarlinLinear(bits=4, group_size=group_size, desc_act=False, sym=True, in_features=layer.in_features,
                            out_features=layer.out_features, bias=False, dtype=torch.bfloat16).to("cuda")
        four.qweight.data = torch.randint(-2**31, 2**31 - 1, four.qweight.shape, dtype=torch.int32, device="cuda")
        four.scales.data = torch.rand(four.scales.shape, dtype=torch.bfloat16, device="cuda") * 0.01
        four.g_idx.data = torch.arange(layer.in_features, dtype=torch.int32, device="cuda") // group_size
        four.qzeros.data.zero_()
        four.post_init()
        setattr(model.get_submodule(parent), child, four)
    return model


def onnx_session(shape: str, spec: str, tokenizer_from: Path, workdir: Path, device: str = "cuda"):
    """The random model through qbench's ``onnx`` backend: saved as a Hugging
    Face folder beside a copy of the tokenizer (the builder writes it out
    too), exported for ``device`` as ``spec`` (``PRECISION[+key=value...]``)
    the way a run's cell does, and loaded as the backend's session."""
    from make_gpu_model import copy_tokenizer  # beside this script

    from qbench_plugins.onnx_ort import OnnxConfig, OnnxRuntime, OnnxSession

    folder = workdir / f"{shape}-hf"
    if not (folder / "config.json").is_file():
        build(shape, device=device).save_pretrained(folder)
        torch.cuda.empty_cache()  # ONNX Runtime allocates its own memory, beside torch's cache
        copy_tokenizer(tokenizer_from, folder)
    precision, *settings = spec.split("+")
    config = OnnxConfig(precision=precision, target=device, **dict(s.split("=", 1) for s in settings))
    out = workdir / f"{shape}-onnx-{spec}"
    if not (out / "model.onnx").is_file():
        out.mkdir(parents=True, exist_ok=True)
        OnnxRuntime().quantize(folder, config, None, out)
    return OnnxSession(out, device, {})


def time_session(session, prompt, new_tokens: int, reps: int) -> list[float]:
    """Per repetition, the median gap between decode steps, as qbench's latency phase takes it."""
    from qbench.metrics.cost import time_generate

    out = []
    for _ in range(reps):
        marks, _ = time_generate(session, prompt, new_tokens)
        out.append(statistics.median((b - a) * 1e3 for a, b in zip(marks, marks[1:])))
    return out


@torch.inference_mode()
def time_hf_generate(model, prompt, new_tokens: int, reps: int, compile: bool = False) -> list[float]:
    """transformers' generate with a static cache: (time for N tokens - time
    for 1) / (N - 1). With a static cache on CUDA, generate compiles the
    forward pass by itself unless ``disable_compile``: ``compile=False``
    measures it truly eager."""
    kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=0, disable_compile=not compile)
    device = next(model.parameters()).device

    def run(n: int) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        model.generate(prompt.to(device), max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync()
        return time.perf_counter() - start

    run(new_tokens)
    return [(run(new_tokens) - run(1)) * 1e3 / (new_tokens - 1) for _ in range(reps)]


def main() -> None:
    from qbench.metrics.roofline import copy_bandwidth, decode_bytes_per_step
    from qbench.sdk.hf import HFSession

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated, from {', '.join(ROWS + ONNX_ROWS + FBGEMM_ROWS)}")
    parser.add_argument("--mode", default="max-autotune", help="torch.compile mode of the compiled rows")
    parser.add_argument("--coordinate-descent", choices=("qbench", "on", "off"), default="qbench",
                        help="inductor's coordinate-descent tuning for the compiled rows: as qbench sets it (on), "
                             "or forced")
    parser.add_argument("--sync", action="store_true", help="compiled rows wait for each step (host-timed)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="GPU kernel time per step of compiled rows")
    parser.add_argument("--tokenizer-from", type=Path, help="onnx rows: a folder holding SmolLM2's tokenizer.json")
    parser.add_argument("--workdir", type=Path, help="onnx rows: where the saved model and its exports stay "
                                                     "(default: a temporary folder)")
    args = parser.parse_args()
    rows = args.rows.split(",")
    if any(r.startswith("onnx-") for r in rows) and args.tokenizer_from is None:
        parser.error("the onnx rows need --tokenizer-from DIR (a folder holding SmolLM2's tokenizer.json)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-goals-"))
    peak = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}: copy peak {peak / 1e12:.2f} TB/s; torch {torch.__version__}; "
          f"shape {args.shape}; prompt {args.prompt_tokens} + {args.new_tokens} new tokens; batch 1", flush=True)
    workload = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch_size": 1}
    prompt = torch.randint(0, 49152, (1, args.prompt_tokens))
    results: dict[str, float] = {}
    for row in rows:
        gc.collect()
        torch.cuda.empty_cache()
        started = time.perf_counter()
        if row.startswith(("bf16", "hf")):
            model = build(args.shape)
        elif row == "gptq-marlin":
            try:
                model = marlin_quantized(args.shape)
            except (ImportError, ModuleNotFoundError, ValueError) as error:  # no gptqmodel, or no Marlin build
                print(f"{row:22s} not measured: {type(error).__name__}: {error}", flush=True)
                continue
        elif row == "fbgemm-int4":
            model = fbgemm_quantized(args.shape)
        elif row.startswith("bnb-"):
            model = bnb_quantized(args.shape, row.removeprefix("bnb-"))
        elif row.startswith("onnx-"):
            model = None  # ONNX Runtime runs its own graph
        else:
            variant, _, choice = row.partition("+")
            if "gemlite" in variant:
                configure_gemlite(choice)
            model = quantized(args.shape, variant)
        eager = row in ("bf16-eager", "hf-generate-eager") or row.endswith("+eager")
        session = (HFSession(model, "cuda") if model is not None
                   else onnx_session(args.shape, row.removeprefix("onnx-").removesuffix("+eager"),
                                     args.tokenizer_from, workdir))
        if row == "hf-generate-eager":
            setup = time.perf_counter() - started
            values = time_hf_generate(model, prompt, args.new_tokens, args.reps)
        else:
            if not eager and model is not None:
                from qbench.sdk.hf import CompiledDecoder

                session.decoder = CompiledDecoder(model, "cuda", mode=args.mode, pipelined=not args.sync)
                if args.coordinate_descent != "qbench":
                    torch._inductor.config.coordinate_descent_tuning = args.coordinate_descent == "on"
            elif not eager:
                eager_tokens = session.generate(prompt, args.new_tokens, lambda *a: None)
                reason = session.use_runtime("compiled")  # ONNX Runtime's CUDA graphs
                if reason:
                    raise SystemExit(f"{row}: {reason}")
                # Random weights leave near-tied logits: the fixed-size cache's
                # attention sums in another order, and a tie can flip.
                differ = (session.generate(prompt, args.new_tokens, lambda *a: None) != eager_tokens).nonzero()
                print(f"  {row}: CUDA-graph tokens " + (
                    "identical to the eager loop's" if not len(differ) else
                    f"follow the eager loop's for {int(differ[0, 1])} of {args.new_tokens} steps"), flush=True)
            try:
                time_session(session, prompt, args.new_tokens, 1)  # warm-up (compiles, checks the captured step)
            except QBenchError as error:  # a compiled step that does not compute the model's step
                print(f"{row:22s} not measured: {error}", flush=True)
                continue
            setup = time.perf_counter() - started
            values = time_session(session, prompt, args.new_tokens, args.reps)
        ms = statistics.median(values)
        results[row] = ms
        per_step = decode_bytes_per_step(session.weight_bytes() - session.unread_weight_bytes(),
                                         session.kv_bytes_per_position(), workload)
        print(f"{row:22s} {ms:7.3f} ms/token (reps {' '.join(f'{v:.3f}' for v in values)}); "
              f"{per_step / 1e9:.2f} GB/step -> {per_step / ms / 1e6:.0f} GB/s = {per_step / ms * 1e3 / peak:.1%} "
              f"of peak; set-up and warm-up {setup:.0f} s", flush=True)
        results[row + ":fraction"] = per_step / ms * 1e3 / peak
        if args.profile and not eager:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the warmed-up shape: no recompiling
                session.generate(prompt, args.new_tokens, lambda *a: None)
            events = prof.key_averages()
            gpu = sum(e.self_device_time_total for e in events) / (args.new_tokens - 1) / 1e3
            print(f"  GPU kernel time {gpu:.3f} ms/step (prefill included)")
            print(events.table(sort_by="self_device_time_total", row_limit=12))
        del session, model
        torch._dynamo.reset()
    # Ratios, not goals: how fast a kernel decodes is the kernel's property;
    # whether qbench times it as the backend's own loop does is fidelity.py's.
    if "bf16-compiled" in results:
        print("against bf16 compiled (same process):")
        for row in (r for r in results if not r.endswith(":fraction") and r != "bf16-compiled"):
            print(f"  {row}: {results['bf16-compiled'] / results[row]:.2f}x")
    if "bf16-eager" in results and "hf-generate-eager" in results:
        print(f"qbench eager / transformers generate eager: {results['bf16-eager'] / results['hf-generate-eager']:.2f}")


if __name__ == "__main__":
    main()
