"""The tutorial's toy plugin: a real quantizer whose metrics must behave."""

import pytest
import torch

from qbench.data.windows import make_windows
from qbench.metrics.scoring import reference_from, score_windows
from qbench.sdk.hf import HFSession
from qbench.sdk.registry import PluginSettings, load_plugins
from tests.conftest import RTN_PLUGIN, session_for


@pytest.fixture
def rtn():
    return load_plugins(PluginSettings(plugin_dirs=(str(RTN_PLUGIN),), allow=())).backends["rtn"]


def test_coarser_quantization_gives_larger_kld(rtn, tiny_model):
    from transformers import AutoModelForCausalLM

    base = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), "cpu")
    windows = make_windows([(i * 7) % 380 for i in range(400)], 64, None, "none", None)
    ref = reference_from(score_windows(base, windows, 4, top_k=512))
    klds = {}
    for spec in ("w8g32", "w4g32", "w2g32"):
        scores = score_windows(session_for(rtn, spec, tiny_model), windows, 4, reference=ref)
        klds[spec] = scores.tensor("kld").mean().item()
    assert 0 < klds["w8g32"] < klds["w4g32"] < klds["w2g32"]
    assert klds["w8g32"] < 1e-3


def test_weights_shrink(rtn, tiny_model):
    from transformers import AutoModelForCausalLM

    fp32 = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), "cpu").weight_bytes()
    q = session_for(rtn, "w4g32", tiny_model)
    linear_params = sum(m.codes.numel() for m in q.model.modules() if hasattr(m, "codes"))
    # int8 codes (1 byte) + one fp32 scale and zero per 32 weights instead of 4 bytes per weight.
    assert fp32 - q.weight_bytes() == pytest.approx(linear_params * (4 - 1 - 8 / 32), rel=1e-6)


def test_impossible_custom_variant_names_the_field(rtn):
    from qbench.core.errors import QBenchError

    with pytest.raises(QBenchError, match="field 'bits'"):
        rtn.parse_variant("bits=12")
    with pytest.raises(QBenchError, match="power of two"):
        rtn.parse_variant("bits=4,group_size=48")
