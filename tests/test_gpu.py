"""CUDA paths: synchronised timing and CUDA memory figures. Skipped without a GPU."""

import time

import pytest
import torch

from qbench.data.windows import make_windows
from qbench.metrics.cost import DEVICE_CLOCK, HOST_CLOCK, latency_metrics, memory_metrics
from qbench.metrics.scoring import score_windows
from qbench.sdk.backend import ignore_step
from qbench.sdk.hf import HFSession

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_session_matches_cpu_and_reports_cuda_memory(tiny_model):
    from transformers import AutoModelForCausalLM

    cpu = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), "cpu")
    gpu = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to("cuda"), "cuda")
    windows = make_windows([(i * 5) % 380 for i in range(300)], 64, None, "none", None)
    a = score_windows(cpu, windows, 2).tensor("token_logprobs")
    b = score_windows(gpu, windows, 2).tensor("token_logprobs")
    assert torch.allclose(a, b, atol=2e-3)
    prompt = torch.tensor([list(range(3, 19))])
    lat = latency_metrics(gpu, prompt, new_tokens=8, warmup=1, min_reps=3, min_seconds=0, max_reps=5)
    assert lat["decode_ms_per_token"]["n"] == 7 * lat["latency_workload"]["repetitions"]
    assert lat["prefill_ms"]["value"] > 0 and lat["latency_workload"]["step_clock"] == HOST_CLOCK
    mem = memory_metrics(gpu, "cuda")
    assert mem["cuda_peak_allocated_bytes"]["value"] >= gpu.weight_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_scoring_runs_ahead_of_the_device_and_gives_float32_log_softmax_figures(tiny_model, dtype):
    """Results reach the host one batch late and the clock times CUDA work
    with events; float16 logits go through CUDA's half-to-float log-softmax.
    Every figure must still be the float32 log-softmax of the model's own
    logits, window by window."""
    from transformers import AutoModelForCausalLM

    from qbench.metrics.cost import BackendClock
    from qbench.metrics.scoring import reference_from

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).to("cuda")
    session = BackendClock(HFSession(model, "cuda"))
    windows = make_windows([(i * 7) % 380 for i in range(400)], 48, None, "none", None)
    started = time.perf_counter()
    ref = reference_from(score_windows(session, windows, 1, top_k=64, greedy=True))
    wall = time.perf_counter() - started
    assert 0 < session.seconds < wall
    assert not ref.topk_logprobs.is_pinned()  # a whole pass's results never stay page-locked
    again = score_windows(session, windows, 1, reference=ref, greedy=True)
    assert torch.equal(again.tensor("token_logprobs"), ref.token_logprobs)
    assert again.tensor("kld").abs().max() < 1e-6 and again.tensor("same_top").min() == 1
    hand, hand_greedy = [], []
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w.input_ids], device="cuda")
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits[0, -w.n_scored:]
            lp = torch.log_softmax(logits.float(), -1)
            hand.append(lp.gather(-1, ids[0, -w.n_scored:, None])[:, 0].cpu())
            hand_greedy.append((lp.argmax(-1) == ids[0, -w.n_scored:]).cpu())
    assert torch.allclose(ref.token_logprobs, torch.cat(hand), atol=1e-6, rtol=0)
    assert torch.equal(again.tensor("greedy"), torch.cat(hand_greedy))


def test_cli_run_on_cuda_end_to_end(tiny_model, tiny_suite, tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "qbench.cli", "run", "--model", str(tiny_model), "--suite",
                           str(tiny_suite), "--device", "cuda", "-b", "fp", "-o", str(tmp_path), "--run-id", "gpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "gpu" / "results.jsonl").read_text().splitlines()]
    # On CUDA the baseline is bf16, what a GPU user computes in.
    assert [r["cell"] for r in records] == ["fp:bf16", "fp:fp32", "fp:fp16"]
    assert records[0]["baseline"] is True
    for r in records:
        m = r["metrics"]
        assert r["env"]["gpu"]["name"]
        assert m["cuda_peak_allocated_bytes"]["value"] >= m["weight_bytes"]["value"]
        assert m["decode_ms_per_token"]["value"] > 0
    assert 0 < records[2]["metrics"]["kld"]["value"] < 0.05


@pytest.mark.parametrize("backend,variant,layer_type", [
    ("torchao", "int4-tinygemm-g128", "Int4TilePackedTo4dTensor"),
    ("torchao", "float8-wo", "Float8Tensor"),
    ("torchao", "float8-dyn", "Float8Tensor"),
    ("torchao", "int8-wo", "Int8Tensor"),
    ("bnb", "nf4", "Linear4bit"),
    ("bnb", "int8", "Linear8bitLt"),
])
def test_quantized_variants_on_cuda(wide_tiny_model, backend, variant, layer_type):
    from transformers import AutoModelForCausalLM

    from qbench.cell.artifacts import obtain_artifact
    from qbench.metrics.scoring import reference_from
    from qbench.sdk.models import fingerprint
    from qbench.sdk.registry import PluginSettings, load_plugins

    b = load_plugins(PluginSettings(allow=("builtin",))).backends[backend]
    name, config = b.parse_variant(variant)
    config = b.for_device(config, "cuda")  # as the worker does: compute_dtype=auto becomes bf16
    availability = b.variant_available(config, "cuda")
    if not availability.ok:
        pytest.skip(availability.reason)
    artifact, _, _ = obtain_artifact(b, name, config, str(wide_tiny_model), fingerprint(wide_tiny_model), None, None)
    session = b.load(artifact, "cuda")
    layer = session.model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer_type in (type(layer).__name__, type(layer.weight).__name__)
    assert not artifact.meta.get("granularity_fallback")
    # A GPU user computes in bf16 (LLM.int8 in fp16, inside bitsandbytes).
    assert session.describe()["compute_dtype"] == ("torch.float16" if variant == "int8" else "torch.bfloat16")
    # ... and so do the layers left unquantized (embeddings, norms, attention, head).
    assert session.model.get_input_embeddings().weight.dtype == torch.bfloat16
    base = HFSession(AutoModelForCausalLM.from_pretrained(wide_tiny_model, dtype=torch.float32).to("cuda"), "cuda")
    windows = make_windows([(i * 5) % 380 for i in range(300)], 64, None, "none", None)
    ref = reference_from(score_windows(base, windows, 2, top_k=512))
    kld = score_windows(session, windows, 2, reference=ref).tensor("kld").mean().item()
    # This random 256-wide model is very sensitive to 4-bit weights (KLD ~0.9
    # for every 4-bit method seen on an H200), far less to 8-bit ones.
    assert 0 < kld < (1.5 if config.nominal_bits() == 4 else 0.3)
    if variant == "int4-tinygemm-g128":
        # tinygemm computes the same asymmetric group-128 scheme as the
        # portable path: their KLDs must agree.
        name, plain = b.parse_variant("bits=4,granularity=group:128,symmetric=false")
        plain_artifact, _, _ = obtain_artifact(b, name, plain, str(wide_tiny_model), fingerprint(wide_tiny_model),
                                               None, None)
        plain_kld = score_windows(b.load(plain_artifact, "cuda"), windows, 2, reference=ref).tensor("kld")
        assert kld == pytest.approx(plain_kld.mean().item(), rel=0.15)
    prompt = torch.tensor([list(range(3, 19))])
    lat = latency_metrics(session, prompt, new_tokens=4, warmup=1, min_reps=2, min_seconds=0, max_reps=3)
    assert lat["decode_ms_per_token"]["value"] > 0
    # Every row that offers runtime=compiled on CUDA passes the compiled
    # runtime's own checks (the compiled step against the eager one, the
    # replay against the call): they raise QBenchError otherwise.
    compiled_row = config.model_copy(update={"runtime": "compiled", "compile_mode": "reduce-overhead"})
    if b.cell_available(compiled_row, "cuda").ok:
        torch._dynamo.reset()
        assert session.use_runtime("compiled", "reduce-overhead") is None
        assert session.generate(prompt, 8, ignore_step).shape == (1, 8)


def test_onnx_runtime_runs_on_its_cuda_provider(tiny_model):
    """Graphs exported for CUDA run on ORT's CUDA provider with no matmul or
    attention left on the CPU, logits stay on the GPU, the cached decode
    loop gives the tokens a full recompute picks, and coarser weights move
    further from PyTorch's figures."""
    pytest.importorskip("onnxruntime_genai")
    import onnxruntime as ort

    from qbench.metrics.scoring import reference_from
    from qbench.sdk.registry import PluginSettings, load_plugins
    from tests.conftest import load_on

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without its CUDA provider: pip install onnxruntime-gpu")
    from transformers import AutoModelForCausalLM

    b = load_plugins(PluginSettings(allow=("builtin",))).backends["onnx"]
    for refused in ("fp32", "int8-dyn"):
        assert "builder writes an fp32 graph for CUDA" in b.variant_available(b.parse_variant(refused)[1], "cuda").reason
    base = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to("cuda"), "cuda")
    windows = make_windows([(i * 5) % 380 for i in range(300)], 64, None, "none", None)
    ref = reference_from(score_windows(base, windows, 2, top_k=512))
    kld = {}
    for variant in ("fp16", "int8", "int4"):
        session = load_on(b, variant, tiny_model, "cuda")
        facts = session.describe()
        assert facts["providers"][0] == "CUDAExecutionProvider" and "MatMul" not in facts["ops_on_cpu"]
        kld[variant] = score_windows(session, windows, 2, reference=ref).tensor("kld").mean().item()
        prompt = torch.tensor([[5, 6, 7, 8]])
        new = session.generate(prompt, 6, ignore_step)
        full = torch.cat([prompt, new], 1)
        logits = session.logits(full, torch.ones_like(full))
        assert logits.is_cuda
        assert logits[0, 3:-1].argmax(-1).tolist() == new[0].tolist()
    lat = latency_metrics(session, torch.tensor([list(range(3, 19))]), new_tokens=4, warmup=1, min_reps=2,
                          min_seconds=0, max_reps=3)
    assert lat["decode_ms_per_token"]["value"] > 0
    assert 0 < kld["fp16"] < kld["int8"] < kld["int4"]
    # runtime=compiled: ORT's CUDA graphs (captured after ORT's warm-up runs,
    # then replayed) decode the eager loop's tokens, at two batch sizes.
    prompts = [torch.tensor([list(range(3, 19))]), torch.tensor([list(range(3, 19)), list(range(40, 56))])]
    eager = [session.generate(p, 12, ignore_step) for p in prompts]
    assert session.use_runtime("compiled") is None
    for _ in range(3):
        assert [session.generate(p, 12, ignore_step).tolist() for p in prompts] == [e.tolist() for e in eager]
    assert "CUDA graphs" in session.describe()["runtime"]
    # Passes outside the graphs (quality's logits) still run, uncaptured, at any shape.
    assert session.logits(full, torch.ones_like(full))[0, 3:-1].argmax(-1).tolist() == new[0].tolist()


def test_onnx_fused_gate_up_keeps_the_plain_exports_logits_on_cuda(wide_tiny_model):
    """fuse_gate_up holds the plain export's int4 values in one MatMulNBits
    per layer: on CUDA it gives the plain graph's logits to fp16 rounding,
    and ORT's CUDA graphs decode the eager loop's tokens through it."""
    pytest.importorskip("onnxruntime_genai")
    import onnxruntime as ort

    from qbench.sdk.registry import PluginSettings, load_plugins
    from tests.conftest import load_on

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without its CUDA provider: pip install onnxruntime-gpu")
    b = load_plugins(PluginSettings(allow=("builtin",))).backends["onnx"]
    ids = torch.tensor([list(range(3, 40))])
    mask = torch.ones_like(ids)
    expected = load_on(b, "int4:block_size=64", wide_tiny_model, "cuda").logits(ids, mask)
    fused = load_on(b, "int4:block_size=64,fuse_gate_up=true", wide_tiny_model, "cuda")
    assert (fused.logits(ids, mask) - expected).abs().max().item() < 2e-2 * expected.abs().max().item()
    tokens = fused.generate(ids, 8, ignore_step)
    assert fused.use_runtime("compiled") is None
    assert fused.generate(ids, 8, ignore_step).tolist() == tokens.tolist()


def test_compiled_step_with_graph_breaks_is_captured_whole(tiny_model):
    """A backend whose kernels dynamo cannot trace splits the compiled step
    into regions: the runtime still captures the whole step (regions and the
    Python launches between them) as one CUDA graph, and its replays decode
    the eager loop's tokens, position after position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to("cuda")
    session = HFSession(model, "cuda")
    prompt = torch.tensor([list(range(3, 40))])
    eager = session.generate(prompt, 10, ignore_step)

    def untraceable(_module, _inputs, output):
        torch._dynamo.graph_break()
        return output * 1.0

    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_hook(untraceable)
    assert session.use_runtime("compiled", "reduce-overhead") is None
    compiled = session.generate(prompt, 10, ignore_step)
    assert isinstance(session.decoder.graph, torch.cuda.CUDAGraph)
    assert (compiled == eager).float().mean() >= 0.9
    # A second call replays the same graph on a zeroed cache.
    graph = session.decoder.graph
    assert torch.equal(session.generate(prompt, 10, ignore_step), compiled) and session.decoder.graph is graph


def test_a_kernel_the_capture_misses_fails_the_compiled_runtime_not_the_timing(tiny_model):
    """A backend whose layer hands on a result computed before the capture
    (as a kernel launched where the capture cannot see it does) leaves the
    CUDA graph replaying one step's values: the runtime refuses it with the
    fix instead of timing it, and the same model unchanged passes."""
    from transformers import AutoModelForCausalLM

    from qbench.core.errors import QBenchError

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to("cuda")
    session = HFSession(model, "cuda")
    prompt = torch.tensor([list(range(3, 40))])
    kept = {}

    @torch.compiler.disable
    def keep_outside_capture(module, _inputs, output):
        if torch.cuda.is_current_stream_capturing():
            return kept[module]
        kept[module] = output.clone()
        return kept[module]

    hooks = [layer.mlp.down_proj.register_forward_hook(keep_outside_capture) for layer in model.model.layers]
    assert session.use_runtime("compiled", "reduce-overhead") is None
    with pytest.raises(QBenchError, match="does not redo the step's work.*use runtime=eager"):
        session.generate(prompt, 6, ignore_step)
    for hook in hooks:
        hook.remove()
    torch._dynamo.reset()
    assert session.use_runtime("compiled", "reduce-overhead") is None
    assert session.generate(prompt, 6, ignore_step).shape == (1, 6)


def test_compiled_runtime_decodes_the_same_tokens_and_records_its_compile_time(tiny_model, tiny_suite, tmp_path):
    """runtime=compiled: a static cache and a CUDA-graph decode step. On the
    tiny model in fp32 its greedy tokens are the eager loop's, and the record
    says the runtime and how long compiling took (apart from latency)."""
    from transformers import AutoModelForCausalLM

    import qbench
    from qbench.execute.results import ResultStore

    session = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to("cuda"), "cuda")
    prompt = torch.tensor([list(range(3, 40))])
    eager = session.generate(prompt, 12, ignore_step)
    # reduce-overhead: inductor's default kernels compile in seconds, where
    # max-autotune benchmarks choices for minutes; the capture is the same.
    assert session.use_runtime("compiled", "reduce-overhead") is None
    # One compilation per workload shape: the cache is allocated before the
    # compiled warm-up, or the second step compiles the step again (a
    # recompilation, which this turns into an error naming the guard that
    # failed). A graph break may split the step into several graphs: that is
    # not a second compilation, and the capture takes them all. Dynamo keeps
    # one cache per code object for the whole process: another test's decoder
    # compiled this step for another shape, which would count here.
    torch._dynamo.reset()
    steps = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = session.generate(prompt, 12, lambda at=None: steps.append(at))
        assert len(steps) == 12 and torch.equal(compiled, session.generate(prompt, 12, ignore_step))
    # Steps are queued ahead and timed on the device: increasing times, handed over at the end.
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert (compiled == eager).float().mean() >= 0.9
    df = qbench.run(model=str(tiny_model), suite=str(tiny_suite), device="cuda", output_dir=str(tmp_path),
                    backends=["fp:fp32:runtime=compiled,compile_mode=reduce-overhead"])
    record = ResultStore(df.attrs["run_dir"]).latest()["fp:fp32:runtime=compiled,compile_mode=reduce-overhead"]
    assert record.ok, record.error
    assert record.config["runtime"] == "compiled" and record.latency_workload["runtime"] == "compiled"
    assert record.config["compile_mode"] == "reduce-overhead"
    assert record.latency_workload["step_clock"] == DEVICE_CLOCK
    assert record.value("compile_seconds") > 0 and record.value("decode_ms_per_token") > 0
    assert record.value("kld") < 1e-4  # quality phases run eager: the same numbers as the baseline


def test_gemlite_int4_artifact_round_trips_through_the_cache(tiny_model, tiny_suite, tmp_path):
    """torchao's safetensors support has no entry for gemlite's packed tensor:
    qbench stores its plain tensors and settings itself. A cell built, then
    loaded again from the cache, decodes with gemlite's kernel and holds
    about a quarter of fp16's bytes for its quantized layers."""
    pytest.importorskip("gemlite")
    import qbench
    from qbench.execute.results import ResultStore

    cell = "torchao:kernel=gemlite,bits=4,granularity=group:32,symmetric=false"
    records = []
    for run_id in ("build", "cached"):
        df = qbench.run(model=str(tiny_model), suite=str(tiny_suite), device="cuda", output_dir=str(tmp_path),
                        backends=[cell], run_id=run_id)
        records.append(ResultStore(df.attrs["run_dir"]).latest()[cell])
    built, cached = records
    assert built.ok and cached.ok, (built.error, cached.error)
    assert cached.artifact.cache_hit and "UIntxBitPackedTensor" in cached.session["kernel"]
    assert cached.value("kld") == pytest.approx(built.value("kld"), rel=1e-4) and cached.value("kld") > 0


@pytest.mark.parametrize("spec,layer_class", [
    ("w4g128:kernel=marlin,compute_dtype=bf16", "MarlinLinear"),
    ("w4g128:kernel=triton", "TritonV2Linear"),
])
def test_gptq_runs_through_gptqmodel_cuda_kernels(wide_tiny_model, spec, layer_class):
    """GPTQ quantizes (on the CPU, as on every device), then loads on CUDA
    through the kernel asked for: its KLD agrees with the CPU's float32
    kernel on the same artifact. Compiled, these layers decoded the first
    token over and over on an H100 (torch 2.11, gptqmodel 7.7): the backend
    refuses runtime=compiled on CUDA, and the compiled runtime's own check
    catches it when asked directly. When this stops failing the check, the
    refusal can go."""
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    from qbench.cell.artifacts import obtain_artifact
    from qbench.core.errors import QBenchError
    from qbench.metrics.scoring import reference_from
    from qbench.sdk.models import fingerprint
    from qbench.sdk.registry import PluginSettings, load_plugins

    gptq = load_plugins(PluginSettings(allow=("builtin",))).backends["gptq"]
    name, config = gptq.parse_variant(spec)
    ids = [(i * 7) % 377 + 3 for i in range(16 * 64)]
    calibration = [ids[i: i + 64] for i in range(0, len(ids), 64)]
    artifact, _, _ = obtain_artifact(gptq, name, config, str(wide_tiny_model), fingerprint(wide_tiny_model),
                                     calibration, "gpu-test")
    session = gptq.load(artifact, "cuda")
    assert type(session.model.get_submodule("model.layers.0.mlp.up_proj")).__name__ == layer_class
    assert session.facts["kernel"] == f"gptqmodel {layer_class}"
    base = HFSession(AutoModelForCausalLM.from_pretrained(wide_tiny_model, dtype=torch.float32).to("cuda"), "cuda")
    windows = make_windows([(i * 5) % 380 for i in range(300)], 64, None, "none", None)
    ref = reference_from(score_windows(base, windows, 2, top_k=512))
    kld = score_windows(session, windows, 2, reference=ref).tensor("kld").mean().item()
    cpu_ref = reference_from(score_windows(HFSession(AutoModelForCausalLM.from_pretrained(
        wide_tiny_model, dtype=torch.float32), "cpu"), windows, 2, top_k=512))
    on_cpu = artifact.model_copy(update={"config": {**artifact.config, "kernel": "auto", "compute_dtype": "auto"}})
    cpu_kld = score_windows(gptq.load(on_cpu, "cpu"), windows, 2, reference=cpu_ref).tensor("kld").mean().item()
    assert 0 < kld < 1.5 and kld == pytest.approx(cpu_kld, rel=0.2)
    compiled_row = config.model_copy(update={"runtime": "compiled", "compile_mode": "reduce-overhead"})
    assert "use runtime=eager" in gptq.cell_available(compiled_row, "cuda").reason
    prompt = torch.tensor([list(range(3, 40))])
    eager = session.generate(prompt, 8, ignore_step)
    assert session.use_runtime("compiled", "reduce-overhead") is None
    with pytest.raises(QBenchError, match="computes another step than the eager model"):
        session.generate(prompt, 8, ignore_step)
    assert eager.shape == (1, 8)


def test_cli_runs_gptq_through_marlin_on_cuda(wide_tiny_model, tiny_suite, tmp_path):
    """`qbench run --device cuda` end to end with a GPTQ row on gptqmodel's
    Marlin kernel (eager: compiled, it decodes wrong tokens)."""
    pytest.importorskip("gptqmodel")
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    row = "gptq:w4g128:kernel=marlin,compute_dtype=bf16"
    proc = subprocess.run([sys.executable, "-m", "qbench.cli", "run", "--model", str(wide_tiny_model), "--suite",
                           str(tiny_suite), "--device", "cuda", "-b", row, "-o", str(tmp_path), "--run-id", "gptq"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gptq" / "results.jsonl").read_text().splitlines()]
    gptq = records[-1]
    assert gptq["status"] == "ok" and gptq["backend"] == "gptq"
    assert gptq["session"]["kernel"] == "gptqmodel MarlinLinear" and gptq["config"]["runtime"] == "eager"
    assert 0 < gptq["metrics"]["kld"]["value"] < 1.5
    assert gptq["metrics"]["decode_ms_per_token"]["value"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_spread_over_two_gpus_gives_one_gpus_figures_and_memory_per_gpu(tiny_model, tiny_suite, tmp_path):
    """``--gpus-per-cell 2``: the cell's layers sit on both GPUs (each holds
    some memory) and the quality figures equal those of the same cell on
    one GPU."""
    from qbench.api import create_run
    from qbench.execute.results import ResultStore
    from qbench.execute.runner import execute

    records = {}
    for per_cell in (1, 2):
        plan, run_dir = create_run(model=str(tiny_model), suite=str(tiny_suite), backends=["fp:bf16"],
                                   device="cuda", output_dir=str(tmp_path), run_id=f"spread{per_cell}",
                                   gpus_per_cell=per_cell)
        execute(plan, run_dir)
        records[per_cell] = ResultStore(run_dir).latest()["fp:bf16"]
    one, two = records[1], records[2]
    assert one.ok and two.ok, (one.error, two.error)
    assert len(two.metrics["cuda_peak_allocated_bytes"]["per_gpu"]) == 2
    assert all(b > 0 for b in two.metrics["cuda_peak_allocated_bytes"]["per_gpu"])
    assert two.env["cuda_visible_devices"].count(",") == 1
    assert two.value("perplexity") == pytest.approx(one.value("perplexity"), rel=1e-3)


def test_the_cuda_canary_times_the_gpu_and_catches_a_busy_one():
    """On CUDA the canary reads the GPU's memory bandwidth with CUDA events
    (and the host's launches for eager rows): steady on an idle GPU, and
    slower while another stream streams memory on the same GPU."""
    import threading

    from qbench.metrics.canary import SLOW_FACTOR, DeviceCanary, slowdown

    canary = DeviceCanary()
    idle = [canary.read(eager=True) for _ in range(5)]
    typical = {key: sorted(r[key] for r in idle)[2] for key in idle[0]}
    assert all(slowdown(r, typical)[0] < SLOW_FACTOR for r in idle), idle
    hog_source = torch.empty(2**30 // 4, device="cuda")
    hog_target = torch.empty_like(hog_source)
    stop = threading.Event()

    def hog() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            while not stop.is_set():
                for _ in range(20):
                    hog_target.copy_(hog_source)
                torch.cuda.current_stream().synchronize()

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        time.sleep(0.5)
        busy = canary.read(eager=False)
    finally:
        stop.set()
        thread.join()
    ratio, key = slowdown(busy, typical)
    assert key == "ms" and ratio > SLOW_FACTOR, (busy, typical)
