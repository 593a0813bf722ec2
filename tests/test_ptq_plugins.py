"""The torchao and bitsandbytes plugins on a tiny model: each CPU variant
quantizes, reloads from its artifact, stays close to the baseline without
being identical to it, and holds the bytes its bit width promises."""

import json
import re
from pathlib import Path

import pytest
import torch

from qbench.core.errors import QBenchError
from qbench.data.windows import make_windows
from qbench.metrics.scoring import reference_from, score_windows
from qbench.sdk.hf import HFSession, unique_tensor_bytes
from qbench.sdk.registry import PluginSettings, load_plugins
from tests.conftest import session_for

CPU_TORCHAO = ["int8-dyn", "int8-wo", "int4-wo-g32", "int8-static", "int8-dyn-legacy"]
CPU_BNB = ["int8", "nf4", "fp4", "nf4-dq"]


@pytest.fixture(scope="module")
def backends():
    return load_plugins(PluginSettings(allow=("builtin",))).backends


@pytest.fixture(scope="module")
def calibration():
    return [[(i * 13 + j) % 380 for j in range(32)] for i in range(4)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM

    base = HFSession(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), "cpu")
    windows = make_windows([(i * 7) % 380 for i in range(300)], 64, None, "none", None)
    return windows, reference_from(score_windows(base, windows, 4, top_k=512))


def mean_kld(session, reference) -> float:
    windows, ref = reference
    return score_windows(session, windows, 4, reference=ref).tensor("kld").mean().item()


def linear_bytes(session) -> tuple[int, int]:
    """(bytes held by the quantized linear layers, their fp32 bytes)."""
    held = fp32 = 0
    for name, module in session.model.named_modules():
        if name.startswith("model.layers.") and name.rsplit(".", 1)[-1].endswith("_proj"):
            held += layer_bytes(module)
            fp32 += module.in_features * module.out_features * 4
    return held, fp32


def layer_bytes(module) -> int:
    if hasattr(module, "_weight_bias"):
        weight, _ = module._weight_bias()  # torch.ao dynamic: codes + per-channel float64 scales
        return weight.numel() + weight.q_per_channel_scales().numel() * 8
    return unique_tensor_bytes(module)


@pytest.mark.parametrize("backend,variant", [("torchao", v) for v in CPU_TORCHAO] + [("bnb", v) for v in CPU_BNB])
def test_variant_is_close_but_not_identical(backends, tiny_model, reference, calibration, backend, variant):
    session = session_for(backends[backend], variant, tiny_model, calibration)
    kld = mean_kld(session, reference)
    bits = backends[backend].parse_variant(variant)[1].nominal_bits()
    assert 0 < kld < (0.05 if bits == 8 else 0.5), kld
    held, fp32 = linear_bytes(session)
    # Packed storage: 8-bit about 4x under fp32, 4-bit about 8x, before
    # scales; torchao keeps sub-byte codes unpacked in int8 (so 4x).
    expected = 4 if bits == 8 or backend == "torchao" else 8
    assert fp32 / expected <= held <= fp32 / expected * 1.3, (held, fp32)


def test_four_bits_are_worse_than_eight(backends, tiny_model, reference):
    torchao = backends["torchao"]
    assert mean_kld(session_for(torchao, "int8-wo", tiny_model), reference) < \
        mean_kld(session_for(torchao, "int4-wo-g32", tiny_model), reference) < \
        mean_kld(session_for(torchao, "bits=2,granularity=group:32", tiny_model), reference)
    bnb = backends["bnb"]
    assert mean_kld(session_for(bnb, "int8", tiny_model), reference) < \
        mean_kld(session_for(bnb, "nf4", tiny_model), reference)


def test_kept_layers_stay_full_precision(backends, tiny_model):
    session = session_for(backends["torchao"], "bits=8,keep=lm_head+*.down_proj", tiny_model)
    kept = [n for n, m in session.model.named_modules() if n.endswith("down_proj") or n == "lm_head"]
    assert kept and all(type(session.model.get_submodule(n).weight) is torch.nn.Parameter for n in kept)
    assert type(session.model.get_submodule("model.layers.0.mlp.up_proj").weight).__name__ == "Int8Tensor"


def test_group_size_that_does_not_divide_falls_back_per_channel_and_says_so(backends, tiny_model):
    from qbench.cell.artifacts import obtain_artifact
    from qbench.sdk.models import fingerprint

    backend = backends["torchao"]
    variant, config = backend.parse_variant("bits=4,granularity=group:256")  # hidden size 64 < 256
    artifact, _, _ = obtain_artifact(backend, variant, config, str(tiny_model), fingerprint(tiny_model), None, None)
    assert artifact.meta["granularity_fallback"]["layers"] == artifact.meta["quantized_layers"]
    assert "per-channel" in artifact.meta["notes"][0]


def test_artifacts_are_safetensors_not_pickle(backends, tiny_model, calibration):
    from qbench.cell.artifacts import obtain_artifact
    from qbench.sdk.models import fingerprint

    for backend, variant in [("torchao", "int8-static"), ("torchao", "int8-dyn-legacy"), ("bnb", "nf4")]:
        b = backends[backend]
        name, config = b.parse_variant(variant)
        config = b.for_device(config, "cpu")  # as the worker does
        artifact, _, _ = obtain_artifact(b, name, config, str(tiny_model), fingerprint(tiny_model), calibration, "c")
        suffixes = {p.suffix for p in Path(artifact.path).iterdir()}
        assert ".safetensors" in suffixes and not suffixes & {".bin", ".pt", ".pth", ".pkl"}, suffixes


def test_layers_left_in_full_precision_fail_loudly(tiny_model):
    from transformers import AutoModelForCausalLM

    from qbench.sdk.hf import require_quantized_layers
    from qbench_plugins.torchao_ptq import _is_torchao_quantized

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(QBenchError, match="2 of 2 layers meant to be quantized are not"):
        require_quantized_layers(model, ["model.layers.0.mlp.up_proj", "lm_head"], _is_torchao_quantized, "torchao")


@pytest.mark.parametrize("spec,message", [
    ("torchao:bits=9", "field 'bits'"),
    ("torchao:bits=4,granularity=tensor", "granularity=tensor needs bits=8"),
    ("torchao:granularity=group:48", "power of two"),
    ("torchao:granularity=rows", "granularity must be tensor, channel or group:N"),
    ("torchao:activations=static,bits=4,granularity=group:32", "activations=static needs bits=8"),
    ("torchao:kernel=legacy,activations=none", "kernel=legacy"),
    ("torchao:dtype=float8,bits=4,granularity=group:32", "dtype=float8 needs bits=8"),
    ("bnb:mode=int8,double_quant=true", "double_quant and compute_dtype apply to mode=nf4|fp4"),
    ("bnb:mode=nf4,threshold=4", "threshold applies to mode=int8 only"),
    ("bnb:mode=int3", "field 'mode'"),
    ("bnb:groupsize=64", "field 'groupsize'"),
])
def test_impossible_custom_variants_are_rejected(backends, spec, message):
    backend, _, settings = spec.partition(":")
    with pytest.raises(QBenchError, match=message):
        backends[backend].parse_variant(settings)


def test_cuda_only_variants_say_so_on_cpu(backends):
    torchao = backends["torchao"]
    for variant in ("int4-tinygemm-g128", "float8-wo", "float8-dyn"):
        availability = torchao.variant_available(torchao.variants()[variant], "cpu")
        assert not availability.ok and "needs CUDA" in availability.reason
    assert not torchao.variant_available(torchao.variants()["int8-dyn-legacy"], "cuda").ok


def test_worker_runs_both_plugins_end_to_end(tiny_model, tiny_suite, tmp_path):
    import qbench
    from qbench.execute.results import ResultStore

    df = qbench.run(model=str(tiny_model), suite=str(tiny_suite), device="cpu",
                    backends=["torchao:int8-wo", "bnb:nf4"], output_dir=str(tmp_path))
    records = ResultStore(Path(df.attrs["run_dir"])).latest()
    base = records["fp:fp32"].value("weight_bytes")
    for cell in ("torchao:int8-wo", "bnb:nf4"):
        record = records[cell]
        assert record.ok, record.error
        assert record.value("kld") > 0
        assert record.value("weight_bytes") < 0.6 * base
        assert record.value("artifact_bytes") > 0
        assert json.dumps(record.session["leaf_module_types"])


def test_gemlite_packed_weights_round_trip_through_safetensors(tmp_path):
    """torchao's safetensors support has no entry for gemlite's packed tensor
    (a prototype class): qbench stores its three plain tensors and its
    settings itself. Building one needs no GPU (packing it does), so the
    round trip is checked here on made-up packed data."""
    from torchao.prototype.quantization.uintx.uintx_bit_packed_tensor import UIntxBitPackedTensor

    from qbench_plugins.torchao_ptq import load_quantized_state, save_quantized_state

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 32, bias=False, dtype=torch.float16)
            self.norm = torch.nn.LayerNorm(32, dtype=torch.float16)

        def tie_weights(self):
            pass

    kwargs = {"in_features": 64, "out_features": 32, "packing_bitwidth": None, "data_contiguous": True,
              "elements_per_sample": 8, "W_group_mode": 3, "meta_args": [0, 4, 32, 15, 8, 1, 1, 2, 1, 0, 3, 1]}
    gen = torch.Generator().manual_seed(0)
    packed = UIntxBitPackedTensor(torch.randint(-2**31, 2**31 - 1, (8, 32), dtype=torch.int32, generator=gen),
                                  torch.rand(2, 32, generator=gen).half(), torch.rand(2, 32, generator=gen).half(),
                                  kwargs, 4, 32, torch.float16)
    model = Tiny()
    model.proj.weight = torch.nn.Parameter(packed, requires_grad=False)
    save_quantized_state(model, tmp_path / "q.safetensors")
    again = Tiny()
    load_quantized_state(again, tmp_path / "q.safetensors", "cpu")
    loaded = again.proj.weight
    assert type(loaded) is UIntxBitPackedTensor and loaded.dtype == torch.float16
    assert loaded.gemlite_kwargs == kwargs and (loaded.bit_width, loaded.group_size) == (4, 32)
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(loaded, name), getattr(packed, name))
    assert torch.equal(again.norm.weight, model.norm.weight)


@pytest.mark.parametrize("spec", ["torchao:int8-wo", "torchao:int4-wo-g32", "hqq:w4g64", "quanto:w8", "bnb:nf4",
                                  "bnb:fp4"])
def test_the_recorded_compute_dtype_is_the_one_the_layers_compute_in(builtin_backends, tiny_model, spec):
    """A label is a measurement. A layer that computes in bf16 gives the same
    output for an fp32 input as for that input rounded to bf16; one that
    computes in fp32 does not."""
    backend, _, variant = spec.partition(":")
    session = session_for(builtin_backends[backend], variant, tiny_model)
    layer = session.model.get_submodule("model.layers.0.mlp.up_proj")
    x = torch.randn(1, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        layer(x)  # a first forward: bitsandbytes repacks its CPU weights here
        inside = "torch.bfloat16" if torch.equal(layer(x), layer(x.to(torch.bfloat16).float())) else "torch.float32"
    assert session.facts["compute_dtype"] == inside


def test_bnb_4bit_on_the_cpu_records_the_dtype_and_kernel_bitsandbytes_runs(backends, tiny_model):
    """bitsandbytes picks its CPU 4-bit path itself: on a CPU with
    AVX512-BF16 it repacks the weights at the first forward pass and casts
    activations to bf16, whatever ``compute_dtype`` says. The plan, the
    record and the kernel label say what the library then did."""
    from bitsandbytes.backends.cpu import ops

    bnb = backends["bnb"]
    session = session_for(bnb, "nf4", tiny_model)
    layer = session.model.get_submodule("model.layers.0.mlp.up_proj")
    x = torch.randn(1, 3, layer.in_features)
    with torch.inference_mode():
        out = layer(x)  # the first forward: the library repacks here, or not
        rounded = layer(x.to(torch.bfloat16).float())
    repacked = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
    # bf16 activations: an fp32 input's low bits never reach the matmul
    assert torch.equal(out, rounded) is repacked
    assert session.facts["compute_dtype"] == ("torch.bfloat16" if repacked else "torch.float32")
    assert bnb.compute_dtype(bnb.parse_variant("nf4")[1], "cpu") == ("bf16" if repacked else "fp32")
    which = "kernels-community gemm" if getattr(ops, "gemm_4bit_forward_kernel", None) else "bitsandbytes' own kernel"
    assert session.facts["kernel"] == (
        f"bitsandbytes CPU 4-bit, bf16 ({which})" if repacked else "bitsandbytes CPU 4-bit (dequantize + matmul)"
    )


@pytest.mark.parametrize("variant,rest", [("nf4", torch.float32), ("nf4:compute_dtype=bf16", torch.bfloat16),
                                          ("int8", torch.float32)])
def test_bnb_loads_the_layers_it_leaves_unquantized_in_the_rows_dtype(backends, tiny_model, variant, rest):
    """Embeddings, norms, attention and the kept head compute in the row's
    dtype, as a user loading with ``torch_dtype`` does, not in the fp32 the
    artifact was saved in (on CUDA, ``auto`` is bf16: tests/test_gpu.py)."""
    session = session_for(backends["bnb"], variant, tiny_model)
    model = session.model
    assert model.get_input_embeddings().weight.dtype == rest
    assert model.lm_head.weight.dtype == rest and model.model.norm.weight.dtype == rest
    # The record says why the session is smaller than the artifact's files (saved in fp32).
    unquantized = sum(p.numel() for n, p in model.named_parameters() if p.dtype == rest)
    storage = session.describe().get("storage")
    if rest == torch.float32:
        assert storage is None
    else:
        assert storage == (f"the artifact stores {unquantized / 1e6:.1f}M unquantized parameters (embeddings, "
                           "norms, kept layers) in float32; this row holds and computes them in bfloat16")


def test_a_row_smaller_than_its_artifact_gets_one_note_with_the_backends_reason(tiny_model, tiny_suite, tmp_path):
    """The worker notes a session whose weights differ from its artifact's
    files by over 10 %; where the backend knows why (``storage``), the note
    gives that reason instead of the generic one, and only once."""
    import qbench
    from qbench.execute.results import ResultStore

    cell = "bnb:nf4:compute_dtype=bf16"
    df = qbench.run(model=str(tiny_model), suite=str(tiny_suite), output_dir=str(tmp_path), backends=[cell])
    record = ResultStore(df.attrs["run_dir"]).latest()[cell]
    assert record.ok, record.error
    held, on_disk = record.value("weight_bytes"), record.value("artifact_bytes")
    assert held < 0.9 * on_disk  # fp32 embeddings and head on disk, bf16 in memory
    storage = [n for n in record.notes if "MiB on disk" in n]
    assert storage == [f"the session holds {held / 2**20:.1f} MiB of weights but its artifact has "
                       f"{on_disk / 2**20:.1f} MiB on disk: {record.session['storage']}"]
    assert record.session["storage"].startswith("the artifact stores")
    assert not any("storage differs" in n for n in record.notes)


@pytest.mark.parametrize("spec,cpu,cuda", [
    ("bnb:nf4", "fp32", "bf16"), ("bnb:int8", "fp32", "fp32"), ("bnb:nf4:compute_dtype=fp16", "fp16", "fp16"),
    ("hqq:w4g64", "fp32", "bf16"), ("quanto:w8", "fp32", "bf16"), ("quanto:w8:compute_dtype=fp32", "fp32", "fp32"),
    ("torchao:int8-wo", "fp32", "bf16"), ("torchao:int4-wo-g32", "fp32", "bf16"),
    ("torchao:int8-dyn-legacy", "fp32", "fp32"), ("torchao:int8-wo:compute_dtype=fp32", "fp32", "fp32"),
])
def test_compute_dtype_follows_the_device_unless_set(builtin_backends, spec, cpu, cuda):
    """A user on a GPU computes in bf16, on the CPU in fp32: ``auto`` is
    resolved where the cell runs, before the record and the cache key are made."""
    backend_name, _, variant = spec.partition(":")
    backend = builtin_backends[backend_name]
    _, config = backend.parse_variant(variant)
    assert backend.for_device(config, "cpu").compute_dtype == cpu
    assert backend.for_device(config, "cuda").compute_dtype == cuda
    assert backend.compute_dtype(config, "cuda") == ("fp16" if spec == "bnb:int8" else cuda)
    if backend_name != "torchao":
        assert backend.for_device(config, "cpu").cache_settings()["compute_dtype"] == cpu


@pytest.mark.parametrize("variant,cpu_key_has_dtype,cuda", [
    ("int8-wo", False, "bf16"), ("int8-wo:compute_dtype=bf16", True, "bf16"),
    ("int4-tinygemm-g128", False, "bf16"), ("int4-gemlite-g128", False, "fp16"), ("float8-wo", False, "bf16"),
])
def test_torchao_compute_dtype_keeps_old_cache_keys(builtin_backends, variant, cpu_key_has_dtype, cuda):
    """The dtype each torchao variant computed in before ``compute_dtype``
    existed (fp32 for the CPU paths, the kernel's own for tinygemm, gemlite
    and float8) leaves the cache key as it was; another dtype joins it, so a
    bf16 artifact never answers for an fp32 one."""
    backend = builtin_backends["torchao"]
    _, config = backend.parse_variant(variant)
    on_cpu, on_cuda = backend.for_device(config, "cpu"), backend.for_device(config, "cuda")
    assert ("compute_dtype" in on_cpu.cache_settings()) is cpu_key_has_dtype
    assert on_cuda.compute_dtype == cuda
    kernel_owned = config.needs_cuda
    assert ("compute_dtype" in on_cuda.cache_settings()) is (not kernel_owned)


@pytest.mark.parametrize("spec,message", [
    ("int4-tinygemm-g128:compute_dtype=fp32", "computes in bf16 only"),
    ("int4-gemlite-g128:compute_dtype=bf16", "computes in fp16 only"),
    ("int8-dyn-legacy:compute_dtype=bf16", "kernel=legacy (torch.ao quantize_dynamic) computes in fp32 only"),
])
def test_torchao_refuses_a_dtype_its_kernel_lacks(builtin_backends, spec, message):
    from qbench.core.errors import QBenchError

    with pytest.raises(QBenchError, match=re.escape(message)):
        builtin_backends["torchao"].parse_variant(spec)
