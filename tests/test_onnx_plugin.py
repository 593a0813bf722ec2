"""The ONNX Runtime plugin on a tiny model: the fp32 export matches the
PyTorch baseline to float tolerance, the quantized graphs really hold
quantized MatMuls, and coarser weights move further from the baseline."""

import pytest
import torch

from qbench.core.errors import QBenchError
from qbench.metrics.scoring import score_windows
from qbench.sdk.backend import ignore_step
from qbench.sdk.registry import PluginSettings, load_plugins
from tests.conftest import session_for
from tests.test_ptq_plugins import reference  # noqa: F401  (fixture)

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def onnx_backend():
    return load_plugins(PluginSettings(allow=("builtin",))).backends["onnx"]


@pytest.fixture(scope="module")
def sessions(onnx_backend, tiny_model):
    return {v: session_for(onnx_backend, v, tiny_model) for v in ("fp32", "int8", "int4", "int8-dyn")}


def test_fp32_export_matches_pytorch(sessions, reference):  # noqa: F811
    windows, ref = reference
    scores = score_windows(sessions["fp32"], windows, 4, reference=ref)
    assert torch.allclose(scores.tensor("token_logprobs"), ref.token_logprobs, atol=1e-4)
    assert scores.tensor("kld").mean().item() < 1e-5


def test_quantized_graphs_and_their_order(sessions, reference):  # noqa: F811
    windows, ref = reference
    kld = {v: score_windows(s, windows, 4, reference=ref).tensor("kld").mean().item() for v, s in sessions.items()}
    assert 0 < kld["int8"] < kld["int4"] and 0 < kld["int8-dyn"] < kld["int4"]
    assert sessions["int4"].describe()["op_counts"]["MatMulNBits"] > 0
    # onnxruntime-genai's builder asks MatMulNBits for int8 activations on the CPU
    # (accuracy_level 4); the row records it, and a plain fp32 graph its own dtype.
    assert sessions["int4"].describe()["compute_dtype"] == (
        "int8 activations where ONNX Runtime has the kernel (MatMulNBits accuracy_level 4)")
    assert sessions["fp32"].describe()["compute_dtype"] == "float32"
    assert sessions["int8-dyn"].describe()["compute_dtype"] == "int8 activations, quantized at run time (dynamic)"
    assert sessions["int8-dyn"].describe()["quantized_matmuls"] > 0
    fp32 = sessions["fp32"].weight_bytes()
    assert sessions["int4"].weight_bytes() < sessions["int8"].weight_bytes() < fp32


def test_greedy_generation_matches_pytorch(sessions, tiny_model):
    from transformers import AutoModelForCausalLM

    from qbench.sdk.hf import HFSession

    base = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), "cpu")
    prompt = torch.tensor([[5, 6, 7, 8]])
    steps = []
    out = sessions["fp32"].generate(prompt, 6, lambda: steps.append(1))
    assert out.tolist() == base.generate(prompt, 6, ignore_step).tolist() and len(steps) == 6


def test_impossible_variants(onnx_backend):
    with pytest.raises(QBenchError, match="block_size must be"):
        onnx_backend.parse_variant("precision=int4,block_size=48")
    with pytest.raises(QBenchError, match="activations=dynamic needs precision=int8"):
        onnx_backend.parse_variant("precision=int4,activations=dynamic")
    with pytest.raises(QBenchError, match="accuracy_level applies to precision=int8 or int4"):
        onnx_backend.parse_variant("fp32:accuracy_level=1")


def test_the_accuracy_level_reaches_the_graph_and_is_recorded(onnx_backend, sessions, reference, tiny_model):  # noqa: F811
    """The builder's CPU default (accuracy_level 4) lets MatMulNBits multiply
    int4 weights with int8 activations; accuracy_level=1 keeps them in fp32:
    the same weights, other arithmetic, and each row says which it ran."""
    windows, ref = reference
    fp32_activations = session_for(onnx_backend, "int4:accuracy_level=1", tiny_model)
    assert fp32_activations.describe()["compute_dtype"] == "float32 (MatMulNBits accuracy_level 1)"
    assert fp32_activations.weight_bytes() == sessions["int4"].weight_bytes()
    a, b = (score_windows(s, windows, 4, reference=ref).tensor("token_logprobs")
            for s in (sessions["int4"], fp32_activations))
    assert not torch.equal(a, b)


def test_ort_errors_keep_the_reason_and_drop_the_cpp_frame():
    """ORT puts a C++ file, line and signature before its reason; the
    one-line error keeps the reason within its length."""
    from qbench_plugins.onnx_ort import ort_reason

    frame = ("/onnxruntime_src/onnxruntime/contrib_ops/cuda/quantization/matmul_nbits.h:313 onnxruntime::contrib::"
             "cuda::MatMulNBits<T>::MatMulNBits(const onnxruntime::OpKernelInfo&) [with T = onnxruntime::MLFloat16] ")
    error = RuntimeError("trace\n[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: " + frame
                         + "has_fpA_intB_gemm_ was false. " + "x" * 500)
    assert ort_reason(error).startswith("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: "
                                        "has_fpA_intB_gemm_ was false.")
    assert len(ort_reason(error)) == 400
    assert ort_reason(RuntimeError("INVALID_GRAPH : This is an invalid model.")) == \
        "INVALID_GRAPH : This is an invalid model."


def test_fused_gate_up_runs_one_matmul_fewer_per_layer(onnx_backend, sessions, tiny_model):
    """fuse_gate_up concatenates the gate and up weights before quantizing:
    blocks run along each output row, so the fused graph holds the same int4
    values and gives the same logits, with one MatMulNBits fewer per layer."""
    from transformers import AutoConfig

    fused = session_for(onnx_backend, "int4:fuse_gate_up=true", tiny_model)
    layers = AutoConfig.from_pretrained(tiny_model).num_hidden_layers
    counts = fused.describe()["op_counts"]
    assert counts["MatMulNBits"] == sessions["int4"].describe()["op_counts"]["MatMulNBits"] - layers
    assert counts["Split"] >= layers
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    assert torch.allclose(fused.logits(ids, mask), sessions["int4"].logits(ids, mask), atol=1e-4)
    assert fused.weight_bytes() == sessions["int4"].weight_bytes()


def test_the_graph_is_exported_for_the_runs_device(onnx_backend, sessions):
    """target=auto follows --device, so the cache key and the record name the
    provider the graph was built for; a graph built for the other device, or
    fp16 on the CPU, is refused with the reason."""
    _, config = onnx_backend.parse_variant("int4")
    assert config.target == "auto"
    assert onnx_backend.for_device(config, "cpu").target == "cpu"
    assert onnx_backend.for_device(config, "cuda").target == "cuda"
    assert onnx_backend.for_device(config, "cpu").cache_settings() != onnx_backend.for_device(config, "cuda"
                                                                                            ).cache_settings()
    for spec, reason in [("fp16", "precision=fp16 is for CUDA"), ("int4:target=cuda", "exported for cuda")]:
        availability = onnx_backend.variant_available(onnx_backend.parse_variant(spec)[1], "cpu")
        assert not availability.ok and reason in availability.reason
    assert sessions["int4"].describe()["providers"] == ["CPUExecutionProvider"]
    assert sessions["int4"].logits(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)).dtype == torch.float32


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_fixed_size_cache_decodes_the_growing_caches_tokens(sessions, variant):
    """The layout ORT's CUDA graphs need (past and present sharing one
    fixed-size buffer, a fixed-size mask) decodes exactly the tokens of the
    growing cache, for two batch sizes and prompt lengths in one session
    (each keeps its own buffers) and when a shape comes back."""
    from qbench_plugins.onnx_ort import StaticDecode

    session = sessions[variant]
    prompts = [torch.tensor([[5, 6, 7, 8]]), torch.tensor([list(range(3, 12)), list(range(20, 29))])]
    eager = [session.generate(p, 7, ignore_step) for p in prompts]
    static = StaticDecode(session)
    steps = []
    for prompt, expected in zip(prompts + prompts[:1], eager + eager[:1]):
        out = static.generate(prompt, 7, lambda: steps.append(1))
        assert out.tolist() == expected.tolist()
    assert len(steps) == 21 and sorted(static.shapes) == [(1, 11), (2, 16)]
    assert [s["graph_id"] for s in static.shapes.values()] == [1, 2]
