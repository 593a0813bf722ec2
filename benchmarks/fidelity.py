"""Each backend timed as its own benchmark times it. For every row, qbench's
decode time per token (its latency phase: the median gap between steps of
``Session.generate``) beside the backend's own reference loop on the same
artifact, device and threads, in one process, and the ratio
qbench / reference (goal: 0.95-1.05).

    python benchmarks/fidelity.py                                   # a row per backend on the CPU, embedded model
    python benchmarks/fidelity.py --device cuda -m DIR --rows torchao:int8-wo:runtime=compiled

References:

- ``gguf``: llama.cpp's own timing of llama-cpp-python's ``Llama.generate``
  loop (``llama_perf_context``: eval time / eval count, the figure
  ``llama-bench -n`` reports), same file and threads.
- ``onnx``: onnxruntime-genai's ``Generator`` loop over the same exported
  folder (``generate_next_token`` per step, greedy).
- any other row with ``runtime=eager`` (``bnb``, ``hqq``, ``quanto``, ``fp``,
  ``torchao`` on the CPU): transformers' ``generate`` on the session's own
  model, greedy, no EOS: (time for N tokens - time for 1) / (N - 1); its
  repetitions alternate with qbench's.
- rows with ``runtime=compiled`` (CUDA): gpt-fast's recipe written over the
  session's own model: a static KV cache, the decode step under
  ``torch.compile(mode="reduce-overhead", fullgraph=True)`` with inductor's
  coordinate-descent tuning, the prefill eager, timed as (time for N tokens
  - time for 1) / (N - 1). A compiled row gets ``compile_mode=reduce-overhead``
  unless it names one: gpt-fast's kernels, so the two differ in the loop alone.

A row is ``backend:variant[:settings]`` as ``qbench run -b`` takes it; the
artifact comes from (or goes into) qbench's cache, built with the
calibration and training sections of ``--suite`` (default: ``default``) as a
run's cell builds it. Exits 1 when a row could not be measured.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

#: One row of every built-in backend.
CPU_ROWS = ("gguf:q4_0", "onnx:int4", "bnb:nf4", "hqq:w4g64", "quanto:w8", "fp:bf16", "torchao:int8-wo",
            "gptq:w4g32", "awq:w4g64", "qat:int4-wo-g32")
CUDA_ROWS = ("fp:bf16:runtime=compiled", "torchao:int8-wo:runtime=compiled",
             "torchao:int4-tinygemm-g128:runtime=compiled")


def load_row(row: str, model, device: str, suite):
    """The row's config (as a cell's worker sees it: the suite's sections
    fill in calibration and training settings) and its loaded session."""
    from qbench.cell.artifacts import artifact_key, build_apart, is_cached, obtain_artifact
    from qbench.data.workload import Workload
    from qbench.sdk.hf import load_tokenizer
    from qbench.sdk.registry import PluginSettings, load_plugins

    backend_name, _, spec = row.partition(":")
    plugins = PluginSettings.from_env(())
    backend = load_plugins(plugins).backends[backend_name]
    name, config = backend.parse_variant(spec)
    if config.runtime == "compiled" and "compile_mode" not in spec:
        config = config.model_copy(update={"compile_mode": "reduce-overhead"})
    config = backend.with_suite(backend.for_device(config, device), suite)
    availability = backend.variant_available(config, device)
    if not availability.ok:
        raise SystemExit(f"{row}: {availability.reason}")
    calibration, calibration_hash = (
        Workload(suite, load_tokenizer(model.path, model.trust_remote_code)).calibration(config.calibration)
        if backend.needs_calibration(config)
        else (None, None)
    )
    if backend.builds_apart and not is_cached(backend.name, artifact_key(model.fingerprint, backend, config,
                                                                          calibration_hash)):
        # as a cell does: what a quantization library leaves behind slows the process that measures
        build_apart(plugins, backend, name, config, model.path, model.fingerprint, calibration, calibration_hash,
                    torch.get_num_threads())
    artifact, hit, _ = obtain_artifact(backend, name, config, model.path, model.fingerprint, calibration,
                                       calibration_hash)
    session = backend.load(artifact, device)
    reason = session.use_runtime(config.runtime, config.compile_mode)
    if reason:
        raise SystemExit(f"{row}: {reason}")
    return config, artifact, session


def qbench_once(session, prompt, new_tokens: int) -> float:
    """One repetition of the latency phase's figure: the median gap between steps."""
    from qbench.metrics.cost import time_generate

    marks, _ = time_generate(session, prompt, new_tokens)
    return statistics.median((b - a) * 1e3 for a, b in zip(marks, marks[1:]))


def qbench_ms(session, prompt, new_tokens: int, reps: int) -> float:
    """Median over repetitions, after a warm-up (which compiles)."""
    qbench_once(session, prompt, new_tokens)
    return statistics.median(qbench_once(session, prompt, new_tokens) for _ in range(reps))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_token(run, new_tokens: int, reps: int, device: str, between=lambda: None) -> float:
    """(time for N tokens - time for 1) / (N - 1), median over repetitions;
    ``between`` runs before each repetition (qbench's own, alternating)."""
    def timed(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        run(n)
        sync(device)
        return time.perf_counter() - start

    timed(new_tokens)  # warm-up
    out = []
    for _ in range(reps):
        between()
        out.append((timed(new_tokens) - timed(1)) * 1e3 / (new_tokens - 1))
    return statistics.median(out)


def gguf_reference(artifact, prompt, new_tokens: int, reps: int) -> float:
    """llama.cpp's own decode timing of llama-cpp-python's generate loop."""
    import llama_cpp

    from qbench_plugins.gguf_backend import MODEL_FILE

    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(Path(artifact.path) / MODEL_FILE), n_ctx=prompt.shape[1] + new_tokens,
                          n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = prompt[0].tolist()
    out = []
    for _ in range(reps + 1):
        llama_cpp.llama_perf_context_reset(llm.ctx)
        for index, _token in enumerate(llm.generate(tokens, top_k=1, temp=0.0, reset=True)):
            if index == new_tokens - 1:
                break
        perf = llama_cpp.llama_perf_context(llm.ctx)
        out.append(perf.t_eval_ms / perf.n_eval)
    return statistics.median(out[1:])


def onnx_reference(artifact, prompt, new_tokens: int, reps: int) -> float:
    """onnxruntime-genai's Generator loop on the exported folder: median gap between steps."""
    import onnxruntime_genai as og

    model = og.Model(str(artifact.path))
    out = []
    for _ in range(reps + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt.numpy())
        marks = []
        while len(marks) < new_tokens and not generator.is_done():
            generator.generate_next_token()
            marks.append(time.perf_counter())
        out.append(statistics.median((b - a) * 1e3 for a, b in zip(marks, marks[1:])))
    return statistics.median(out[1:])


def generate_reference(session, prompt, new_tokens: int, reps: int, device: str, between=lambda: None) -> float:
    """transformers' generate on the session's own model, greedy, EOS ignored."""
    model, ids = session.model, prompt.to(device)

    @torch.inference_mode()
    def run(n: int):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)

    return per_token(run, new_tokens, reps, device, between)


def alternating(session, prompt, new_tokens: int, reps: int, device: str) -> tuple[float, float]:
    """qbench's figure and ``generate``'s on one session, their repetitions
    alternating, so that a drift in the machine's speed reaches both alike."""
    qbench_once(session, prompt, new_tokens)  # warm-up
    ours: list[float] = []
    theirs = generate_reference(session, prompt, new_tokens, reps, device,
                                lambda: ours.append(qbench_once(session, prompt, new_tokens)))
    return statistics.median(ours), theirs


def gpt_fast_reference(session, prompt, new_tokens: int, reps: int) -> float:
    """gpt-fast's decode loop over the session's own model."""
    import torch._inductor.config
    from transformers import StaticCache

    torch._dynamo.reset()
    torch._inductor.config.coordinate_descent_tuning = True
    torch._inductor.config.triton.unique_kernel_names = True
    from qbench.sdk.hf import cache_argument

    model, ids = session.model, prompt.to("cuda")
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
    cache_kw = cache_argument(model)
    # gpt-fast's cache is a module buffer, a static address to inductor's CUDA
    # graphs, which may then mutate it. transformers allocates a StaticCache's
    # tensors at first use (marking its keys and values static): allocated
    # here by one eager step, and every tensor it holds marked, so that no
    # mutated cache tensor makes inductor skip its graphs.
    with torch.inference_mode():
        model(input_ids=ids[:, :1], **{cache_kw: cache}, cache_position=torch.arange(1, device="cuda"), use_cache=True)
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                torch._dynamo.mark_static_address(value)

    def decode_one_token(token, position):
        logits = model(input_ids=token, **{cache_kw: cache}, cache_position=position, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)

    @torch.inference_mode()
    def run(n: int):
        cache.reset()
        length = ids.shape[1]
        logits = model(input_ids=ids, **{cache_kw: cache}, cache_position=torch.arange(length, device="cuda"),
                       use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        position = torch.tensor([length], device="cuda")
        for _ in range(n - 1):
            token = step(token, position).clone()  # the CUDA graph's output buffer is reused
            position += 1

    from torch._dynamo.utils import counters

    counters["inductor"]["cudagraph_skips"] = 0
    ms = per_token(run, new_tokens, reps, "cuda")
    skips = counters["inductor"]["cudagraph_skips"]
    if skips:  # inductor says why only with TORCH_LOGS=cudagraphs
        print(f"  the gpt-fast loop ran without inductor's CUDA graphs ({skips} skip(s); TORCH_LOGS=cudagraphs says "
              "why): its figure includes the host's launches", flush=True)
    return ms


def main() -> None:
    from qbench.core.processes import quiet_library_logs
    from qbench.data.suites import load_suite
    from qbench.sdk.models import DEFAULT_MODEL, resolve_model

    quiet_library_logs()

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("-m", "--model", default=DEFAULT_MODEL)
    parser.add_argument("--rows", help="comma-separated backend:variant[:settings] (default: the device's rows)")
    parser.add_argument("--suite", default="default",
                        help="whose calibration and training sections the rows that need them take, as in a run")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads of both loops (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows.split(",") if args.rows else list(CPU_ROWS if args.device == "cpu" else CUDA_ROWS)
    model = resolve_model(args.model)
    suite = load_suite(args.suite)
    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (1, args.prompt_tokens))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; model {model.name} ({model.fingerprint}); prompt {args.prompt_tokens}"
          f" + {args.new_tokens} new tokens, batch 1, {args.reps} repetitions", flush=True)
    print(f"{'row':45s} {'qbench':>10s} {'reference':>10s} {'ratio':>6s}  reference loop")
    outside, unmeasured = [], []
    for row in rows:
        try:
            config, artifact, session = load_row(row, model, args.device, suite)
        except (SystemExit, Exception) as error:  # one row that cannot run leaves the others
            print(f"{row:45s} not measured: {error}", flush=True)
            unmeasured.append(row)
            continue
        backend = row.split(":", 1)[0]
        if backend in ("gguf", "onnx") or config.runtime == "compiled":
            ours = qbench_ms(session, prompt, args.new_tokens, args.reps)
        if backend in ("gguf", "onnx"):
            session.close()  # its library's threads and memory are the reference's to use
            session = None
            gc.collect()
        if backend == "gguf":
            theirs, how = gguf_reference(artifact, prompt, args.new_tokens, args.reps), "llama.cpp perf counters"
        elif backend == "onnx":
            theirs, how = onnx_reference(artifact, prompt, args.new_tokens, args.reps), "onnxruntime-genai Generator"
        elif config.runtime == "compiled":
            theirs, how = gpt_fast_reference(session, prompt, args.new_tokens, args.reps), "gpt-fast recipe"
        else:
            ours, theirs = alternating(session, prompt, args.new_tokens, args.reps, args.device)
            how = "transformers generate, repetitions alternating with qbench's"
        ratio = ours / theirs
        if not 0.95 <= ratio <= 1.05:
            outside.append(row)
        print(f"{row:45s} {ours:7.3f} ms {theirs:7.3f} ms {ratio:6.3f}  {how}", flush=True)
        if session is not None:
            session.close()
        del session
        if args.device == "cuda":
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    measured = len(rows) - len(unmeasured)
    print(f"within 0.95-1.05: {measured - len(outside)} of {measured} measured rows"
          + (f"; outside: {', '.join(outside)}" if outside else "")
          + (f"; not measured: {', '.join(unmeasured)}" if unmeasured else ""))
    sys.exit(1 if unmeasured else 0)


if __name__ == "__main__":
    main()
