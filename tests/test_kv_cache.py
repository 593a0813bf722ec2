"""kv_cache: the KV cache as a second thing to quantize. Quality must move
when the cache gets coarser, the weights' artifact must not change, and
every backend or runtime that cannot quantize its cache says why."""

import pytest
import torch

from qbench.core.errors import QBenchError
from tests.conftest import session_for

WINDOW = 320  # more than the 128 positions transformers' quantized caches keep in full precision


def _windows():
    from qbench.data.windows import make_windows

    return make_windows([(i * 7) % 380 + 3 for i in range(2 * WINDOW)], WINDOW, None, "none", None)


def _kld(session, windows, reference) -> float:
    from qbench.metrics.scoring import score_windows

    return score_windows(session, windows, 2, reference=reference).tensor("kld").mean().item()


@pytest.fixture(scope="module")
def long_reference(wide_tiny_model):
    """The wide tiny model's fp32 scores over 320-token windows, its cache full."""
    from transformers import AutoModelForCausalLM

    from qbench.metrics.scoring import reference_from, score_windows
    from qbench.sdk.hf import HFSession

    base = HFSession(AutoModelForCausalLM.from_pretrained(wide_tiny_model, dtype=torch.float32), "cpu")
    windows = _windows()
    return windows, reference_from(score_windows(base, windows, 2, top_k=64))


def test_a_coarser_cache_diverges_more_and_holds_fewer_bytes(builtin_backends, wide_tiny_model, long_reference):
    windows, reference = long_reference
    fp = builtin_backends["fp"]
    divergence, computed, held = {}, {}, {}
    for kind in ("full", "hqq-int8", "hqq-int4", "hqq-int2", "fp8", "quanto-int4"):
        session = session_for(fp, f"fp32:kv_cache={kind}", wide_tiny_model)
        assert session.use_kv_cache(kind) is None
        divergence[kind] = _kld(session, windows, reference)
        computed[kind] = session.kv_bytes_per_position()
        held[kind] = session.kv_measured_bytes_per_position()
    # a full cache scores in one pass, exactly as the baseline did
    assert divergence["full"] < 1e-9 and held["full"] is None
    assert 0 < divergence["hqq-int8"] < divergence["hqq-int4"] < divergence["hqq-int2"], divergence
    assert 0 < divergence["fp8"] < divergence["hqq-int2"] and 0 < divergence["quanto-int4"], divergence
    # 2 layers x 2 KV heads x 64 x (keys and values) = 512 values a position
    assert computed["full"] == 512 * 4  # float32
    assert computed["fp8"] == 512
    assert computed["hqq-int8"] == round(512 * (1 + 2 * 4 / 64))  # a scale and a zero point per 64 values
    assert computed["hqq-int4"] == round(512 * (0.5 + 2 * 4 / 64))
    # what the cache held after a 320-token window: less than full, more than the nominal
    # (128 of its positions at most are still full precision)
    for kind in ("hqq-int8", "hqq-int4", "hqq-int2"):
        assert computed[kind] <= held[kind] < computed["full"], (kind, held[kind])
    assert held["hqq-int2"] < held["hqq-int4"] < held["hqq-int8"], held


def test_decoding_through_a_quantized_cache_stays_greedy_and_changes_late_tokens_only(
    builtin_backends, wide_tiny_model
):
    """The prompt's own forward pass sees full-precision keys; later steps
    read the quantized cache, so a 2-bit cache may change what follows."""
    fp = builtin_backends["fp"]
    prompt = torch.tensor([[(i * 11) % 380 + 3 for i in range(200)]])
    outputs = {}
    for kind in ("full", "hqq-int8", "hqq-int2"):
        session = session_for(fp, "fp32", wide_tiny_model)
        assert session.use_kv_cache(kind) is None
        calls: list[float] = []
        outputs[kind] = session.generate(prompt, 12, lambda *_, calls=calls: calls.append(1.0))
        assert outputs[kind].shape == (1, 12) and len(calls) == 12
    assert torch.equal(outputs["full"][:, :1], outputs["hqq-int2"][:, :1])  # the first token: from the prompt pass


def test_the_cache_type_is_not_part_of_the_weights_artifact(builtin_backends):
    from qbench.cell.artifacts import artifact_key

    fp = builtin_backends["fp"]
    keys = {artifact_key("m", fp, fp.parse_variant(spec)[1], None) for spec in ("fp32", "fp32:kv_cache=hqq-int4")}
    assert len(keys) == 1
    assert fp.parse_variant("fp32:kv_cache=hqq-int4")[1].settings()["kv_cache"] == "hqq-int4"


def test_a_backend_that_cannot_quantize_its_cache_is_refused_at_planning(builtin_backends):
    from qbench.execute.runner import plan_cells
    from qbench.sdk.registry import LoadedPlugins

    loaded = LoadedPlugins(pm=None, backends=dict(builtin_backends))
    with pytest.raises(QBenchError, match=r"onnx:int4:kv_cache=q8_0: backend onnx cannot store its KV cache as "
                                          r"q8_0 \(its choices: full only\); backends that can: gguf"):
        plan_cells(loaded, ["onnx:int4:kv_cache=q8_0"], "fp:fp32", "cpu")
    with pytest.raises(QBenchError, match="backends that can: awq, bnb, fp, gptq, hqq, qat, quanto, torchao"):
        plan_cells(loaded, ["gguf:q8_0:kv_cache=fp8"], "fp:fp32", "cpu")
    with pytest.raises(QBenchError, match="no loaded backend can"):
        plan_cells(loaded, ["fp:fp32:kv_cache=int3"], "fp:fp32", "cpu")


def test_the_compiled_runtime_refuses_a_quantized_cache(builtin_backends, tiny_model):
    session = session_for(builtin_backends["fp"], "fp32", tiny_model)
    assert session.use_kv_cache("fp8") is None
    reason = session.use_runtime("compiled")
    assert "runtime=compiled replays a static KV cache" in reason and "runtime=eager" in reason


def test_gguf_quantizes_its_cache_in_llama_cpp(builtin_backends, wide_tiny_model, long_reference):
    pytest.importorskip("llama_cpp")
    windows, reference = long_reference
    gguf = builtin_backends["gguf"]
    divergence, per_position = {}, {}
    for kind in ("full", "q8_0", "q4_0"):
        session = session_for(gguf, "f32", wide_tiny_model)
        assert session.use_kv_cache(kind) is None
        divergence[kind] = _kld(session, windows, reference)
        per_position[kind] = session.kv_bytes_per_position()
        if kind != "full":
            assert session.describe()["flash_attention"].startswith("on")
    # f16 keys and values already differ a little from float32
    assert 0 < divergence["full"] < divergence["q8_0"] < divergence["q4_0"], divergence
    assert per_position == {"full": 512 * 2, "q8_0": 512 * 34 // 32, "q4_0": 512 * 18 // 32}
