"""The awq plugin on the wide tiny model: AWQ through gptqmodel quantizes
with calibration samples into real AWQ layers that hold 4-bit codes, and an
AWQ checkpoint made elsewhere runs as it is with the same result."""

import pytest

from qbench.core.errors import QBenchError
from tests.conftest import mean_kld

pytest.importorskip("gptqmodel")

CALIBRATION = [[(i * 7 + j) % 377 + 3 for j in range(64)] for i in range(16)]


@pytest.fixture(scope="module")
def awq(builtin_backends):
    return builtin_backends["awq"]


@pytest.fixture(scope="module")
def artifact(awq, wide_tiny_model):
    from qbench.cell.artifacts import obtain_artifact
    from qbench.sdk.models import fingerprint

    built, _, _ = obtain_artifact(awq, "w4g128", awq.variants()["w4g128"], str(wide_tiny_model),
                                  fingerprint(wide_tiny_model), CALIBRATION, "test")
    return built


def test_awq_quantizes_into_4bit_awq_layers(awq, artifact, wide_reference):
    session = awq.load(artifact, "cpu")
    layer = session.model.get_submodule("model.layers.0.mlp.up_proj")
    assert "Awq" in type(layer).__name__ and session.facts["kernel"].startswith("gptqmodel ")
    assert layer.qweight.numel() * 8 == 256 * 512  # eight 4-bit codes per int32
    # packed and computed in bf16: the report notes the cast against an fp32 baseline (qbench.core.dtypes.cast_note)
    assert session.facts["compute_dtype"] == "torch.bfloat16"
    assert 0 < mean_kld(session, wide_reference) < 1.5
    # bf16 embeddings and head plus 4-bit layers: under a third of the fp32 bytes
    assert session.weight_bytes() < wide_reference[2] / 3


def test_awq_checkpoint_runs_as_it_is(awq, artifact, wide_reference, wide_tiny_model, builtin_backends):
    from qbench.cell.artifacts import obtain_artifact
    from qbench.sdk.models import fingerprint

    name, config = awq.parse_variant(f"prequantized:path={artifact.path}")
    checkpoint, _, _ = obtain_artifact(awq, name, config, str(wide_tiny_model), fingerprint(wide_tiny_model),
                                       None, None)
    same = mean_kld(awq.load(artifact, "cpu"), wide_reference)
    assert mean_kld(awq.load(checkpoint, "cpu"), wide_reference) == pytest.approx(same)
    # A GPTQ backend refuses it: the checkpoint says AWQ.
    gptq = builtin_backends["gptq"]
    with pytest.raises(QBenchError, match="is not a GPTQ checkpoint"):
        obtain_artifact(gptq, "prequantized", gptq.parse_variant(f"prequantized:path={artifact.path}")[1],
                        str(wide_tiny_model), fingerprint(wide_tiny_model), None, None)


def test_settings_that_do_not_apply_to_awq_are_refused(awq):
    for spec in ("w4g128:desc_act=true", "w4g128:kernel=marlin", "bits=3"):
        with pytest.raises(QBenchError, match="invalid variant"):
            awq.parse_variant(spec)
    assert not awq.variant_available(awq.variants()["prequantized"], "cpu").ok


def test_group_size_that_does_not_divide_a_layer_is_refused_before_quantizing(awq, tiny_model):
    from qbench.cell.artifacts import obtain_artifact
    from qbench.sdk.models import fingerprint

    # the tiny model's layers take 64 inputs (and 128): group 128 divides not all of them
    with pytest.raises(QBenchError, match="group_size 128 does not divide the 64 input features"):
        obtain_artifact(awq, "w4g128", awq.variants()["w4g128"], str(tiny_model), fingerprint(tiny_model),
                        CALIBRATION, "test")
