"""The hqq and quanto plugins on the wide tiny model: real quantized layers,
weights that shrink with the bit width, KLD that grows as the bits drop, and
artifacts that reload to the same logits."""

import pytest
import torch

from qbench.core.errors import QBenchError
from qbench.metrics.scoring import score_windows
from qbench.sdk.hf import HFSession
from tests.conftest import mean_kld, session_for

pytest.importorskip("hqq")
pytest.importorskip("optimum.quanto")


CALIBRATION = [[(i * 7 + j) % 377 + 3 for j in range(64)] for i in range(8)]


@pytest.mark.parametrize("backend,ladder,layer_type", [
    ("hqq", ["w8g64", "w4g64", "w2g32"], "HQQLinear"),
    ("quanto", ["w8", "w4", "w2"], "QLinear"),
])
def test_fewer_bits_mean_fewer_bytes_and_more_divergence(builtin_backends, wide_tiny_model, wide_reference, backend,
                                                         ladder, layer_type):
    sessions = [session_for(builtin_backends[backend], spec, wide_tiny_model) for spec in ladder]
    for session in sessions:
        assert type(session.model.get_submodule("model.layers.1.mlp.down_proj")).__name__ == layer_type
        assert type(session.model.get_submodule("lm_head")).__name__ == "Linear"  # kept by default
    divergence = [mean_kld(s, wide_reference) for s in sessions]
    size = [s.weight_bytes() for s in sessions]
    assert 0 < divergence[0] < 0.05, divergence  # 8-bit: close to the baseline
    assert divergence[0] < divergence[1] < divergence[2], divergence
    assert wide_reference[2] > size[0] > size[1] > size[2], size


def test_hqq_counts_its_scales_and_zero_points(builtin_backends, wide_tiny_model):
    session = session_for(builtin_backends["hqq"], "w4g64", wide_tiny_model)
    layer = session.model.get_submodule("model.layers.0.mlp.up_proj")
    codes = layer.W_q.numel() * layer.W_q.element_size()
    assert codes == 512 * 256 // 2  # two 4-bit codes per byte
    # fp32 scale and zero point per group of 64: 8 bytes per 64 weights.
    assert layer.meta["scale"].numel() * 4 + layer.meta["zero"].numel() * 4 == 512 * 256 // 64 * 8
    from qbench.sdk.hf import HFSession as Plain

    assert session.weight_bytes() - Plain.weight_bytes(session) == sum(
        (m.meta["scale"].numel() + m.meta["zero"].numel()) * 4 for m in session.model.modules()
        if type(m).__name__ == "HQQLinear")


def test_artifacts_reload_to_the_same_logits(builtin_backends, wide_tiny_model, wide_reference):
    windows = wide_reference[0]
    for backend, spec, calibration in (("hqq", "w4g64", None), ("quanto", "w4", None),
                                       ("quanto", "w8a8", CALIBRATION)):
        first = session_for(builtin_backends[backend], spec, wide_tiny_model, calibration)  # quantizes
        second = session_for(builtin_backends[backend], spec, wide_tiny_model, calibration)  # from the cache
        a = score_windows(first, windows, 2).tensor("token_logprobs")
        b = score_windows(second, windows, 2).tensor("token_logprobs")
        assert torch.equal(a, b), (backend, spec)


def test_quanto_int8_activations_calibrate_and_cost_quality(builtin_backends, wide_tiny_model, wide_reference):
    quanto = builtin_backends["quanto"]
    assert quanto.needs_calibration(quanto.variants()["w8a8"]) and not quanto.needs_calibration(
        quanto.variants()["w8"])
    weights_only = mean_kld(session_for(quanto, "w8", wide_tiny_model), wide_reference)
    with_activations = mean_kld(session_for(quanto, "w8a8", wide_tiny_model, CALIBRATION), wide_reference)
    assert weights_only < with_activations < 0.5


def test_bad_settings_are_refused_with_the_fix(builtin_backends):
    with pytest.raises(QBenchError, match="group_size must be a power of two"):
        builtin_backends["hqq"].parse_variant("bits=4,group_size=48")
    with pytest.raises(QBenchError, match="invalid variant"):
        builtin_backends["hqq"].parse_variant("bits=5")
    with pytest.raises(QBenchError, match="invalid variant"):
        builtin_backends["quanto"].parse_variant("weights=int3")


@pytest.mark.parametrize("backend,spec", [("hqq", "w8g64"), ("quanto", "w8"), ("quanto", "w4")])
def test_tied_embeddings_reload_tied(builtin_backends, tied_model, backend, spec):
    from transformers import AutoModelForCausalLM

    session = session_for(builtin_backends[backend], spec, tied_model)
    model = session.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base = HFSession(AutoModelForCausalLM.from_pretrained(tied_model, dtype=torch.float32), "cpu")
    assert torch.equal(model.model.embed_tokens.weight, base.model.model.embed_tokens.weight)
