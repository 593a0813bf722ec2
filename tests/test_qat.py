"""The qat plugin on the wide tiny model: QAT that does not train converts to
exactly the post-training row, distillation lowers KLD against that row at
the same bits, and the suite's qat section fills the training settings."""

import pytest

from qbench.core.errors import QBenchError
from tests.conftest import mean_kld, session_for

pytest.importorskip("torchao")

CALIBRATION = [[(i * 5 + j * 5) % 380 for j in range(64)] for i in range(16)]


def test_untrained_qat_is_exactly_the_post_training_row(builtin_backends, wide_tiny_model, wide_reference):
    ptq = session_for(builtin_backends["torchao"], "int4-wo-g32", wide_tiny_model)
    qat = session_for(builtin_backends["qat"], "int4-wo-g32:steps=1,lr=1e-12,seq_len=64,batch_size=1",
                      wide_tiny_model, CALIBRATION)
    layer = qat.model.get_submodule("model.layers.0.mlp.up_proj").weight
    assert type(layer).__name__ == type(ptq.model.get_submodule("model.layers.0.mlp.up_proj").weight).__name__
    assert qat.weight_bytes() == ptq.weight_bytes()
    assert mean_kld(qat, wide_reference) == pytest.approx(mean_kld(ptq, wide_reference), rel=1e-4)


def test_distillation_lowers_kld_against_post_training_at_the_same_bits(builtin_backends, wide_tiny_model,
                                                                         wide_reference):
    ptq = mean_kld(session_for(builtin_backends["torchao"], "int4-wo-g32", wide_tiny_model), wide_reference)
    qat = mean_kld(session_for(builtin_backends["qat"], "int4-wo-g32:steps=20,lr=1e-4,seq_len=64,batch_size=4",
                               wide_tiny_model, CALIBRATION), wide_reference)
    # seen: 0.612 against 0.870
    assert 0 < qat < 0.85 * ptq


def test_suite_fills_training_settings_and_variants_override_them(builtin_backends, tiny_suite):
    from qbench.data.suites import load_suite

    qat = builtin_backends["qat"]
    suite = load_suite(str(tiny_suite))
    filled = qat.with_suite(qat.variants()["int4-wo-g32"], suite)
    assert (filled.steps, filled.lr, filled.seq_len, filled.batch_size) == (
        suite.qat.steps, suite.qat.lr, suite.qat.seq_len, suite.qat.batch_size)
    _, own = qat.parse_variant("int4-wo-g32:steps=7")
    assert qat.with_suite(own, suite).steps == 7
    assert qat.needs_calibration(own)


def test_bad_qat_settings_are_refused(builtin_backends):
    with pytest.raises(QBenchError, match="invalid variant"):
        builtin_backends["qat"].parse_variant("int4-wo-g32:bits=8")
    with pytest.raises(QBenchError, match="invalid variant"):
        builtin_backends["qat"].parse_variant("int4-wo-g32:lr=-1")
    from qbench_plugins.qat import training_rows

    with pytest.raises(QBenchError, match="fewer than one training row"):
        training_rows([[1, 2, 3]], 64)
