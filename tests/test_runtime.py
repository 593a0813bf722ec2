"""The runtime setting (eager or compiled): how the latency workload decodes.
It never changes an artifact, and a runtime a session cannot provide fails
the cell with the reason. The CUDA side is in test_gpu.py."""

import pytest
import torch

from qbench.api import create_run
from qbench.execute.results import ResultStore
from qbench.execute.runner import execute
from qbench.sdk.registry import PluginSettings, load_plugins


def test_runtime_is_a_setting_of_every_backend_outside_the_cache_key():
    loaded = load_plugins(PluginSettings(allow=("builtin",)))
    for backend in loaded.backends.values():
        name, config = next(iter(backend.variants().items()))
        _, compiled = backend.parse_variant(f"{name}:runtime=compiled")
        assert compiled.runtime == "compiled" and config.runtime == "eager"
        assert compiled.cache_settings() == config.cache_settings()  # same artifact
        _, light = backend.parse_variant(f"{name}:runtime=compiled,compile_mode=reduce-overhead")
        assert light.compile_mode == "reduce-overhead" and compiled.compile_mode == "max-autotune"
        assert light.cache_settings() == config.cache_settings()


def test_compiled_runtime_on_cpu_fails_the_cell_with_the_reason(tiny_model, tiny_suite, tmp_path):
    plan, run_dir = create_run(model=str(tiny_model), suite=str(tiny_suite), device="cpu", output_dir=str(tmp_path),
                               backends=["fp:bf16:runtime=compiled"])
    execute(plan, run_dir)
    records = ResultStore(run_dir).latest()
    assert records["fp:fp32"].ok
    failed = records["fp:bf16:runtime=compiled"]
    assert not failed.ok and failed.phase == "prepare" and "runtime=compiled needs CUDA" in failed.error


def test_a_session_without_the_runtime_says_why():
    from qbench_plugins.onnx_ort import OnnxSession

    session = object.__new__(OnnxSession)
    session.device = "cpu"
    assert "ONNX Runtime's CUDA graphs: CUDA only" in OnnxSession.use_runtime(session, "compiled")
    assert OnnxSession.use_runtime(session, "eager") is None
    assert "ONNX Runtime's CUDA graphs have no modes" in OnnxSession.use_runtime(session, "compiled", "reduce-overhead")


def test_batch_sweep_times_every_batch_size_and_reports_it(tiny_model, tiny_suite, tmp_path):
    suite = tmp_path / "sweep.yaml"
    suite.write_text(tiny_suite.read_text().replace("latency: {prompt_tokens: 16,", "latency: {batch_size: [1, 3], "
                                                                                    "prompt_tokens: 16,"))
    (tmp_path / "mc.jsonl").write_text((tiny_suite.parent / "mc.jsonl").read_text())
    plan, run_dir = create_run(model=str(tiny_model), suite=str(suite), device="cpu", output_dir=str(tmp_path),
                               backends=["fp:bf16"])
    execute(plan, run_dir)
    record = ResultStore(run_dir).latest()["fp:bf16"]
    assert record.ok, record.error
    assert sorted(record.latency_sweep) == [1, 3]
    three = record.latency_sweep[3]
    assert three["decode_tokens_per_s"].value == 3e3 / three["decode_ms_per_token"].value
    # The row's own latency is the first batch size's (one trial: the same measurement).
    assert record.latency_sweep[1]["decode_ms_per_token"].value == pytest.approx(record.value("decode_ms_per_token"))
    assert record.latency_workload["batch_size"] == 1
    assert 0 < three["roofline_fraction"].value
    from qbench.present.report import write_report

    md, _ = write_report(run_dir)
    text = md.read_text()
    assert "Batch sweep" in text and "| fp:bf16 | 3 |" in text
    assert (run_dir / "report_files" / "throughput_vs_batch.png").read_bytes().startswith(b"\x89PNG")


class _Replay:
    """Stands in for a captured CUDA graph on the CPU: ``stale`` replays what
    the capture saw (the token and position of the warm-up, as a kernel
    launched outside the capture would), otherwise it redoes the step."""

    def __init__(self, decoder, stale: bool):
        self.decoder, self.stale = decoder, stale

    def replay(self):
        d = self.decoder
        token, position = (torch.zeros_like(d.token), torch.zeros_like(d.position)) if self.stale else (
            d.token, d.position)
        d.token.copy_(d._decode(token, position))
        d.position.add_(1)


def test_a_captured_step_that_does_not_compute_the_models_step_is_refused(tiny_model):
    """The compiled runtime checks its captured step before timing it. A
    replay must write the KV cache that a plain call of the compiled step
    writes: one that hands on the capture's results (a kernel outside the
    capture) is caught. The compiled call must write the cache the eager step
    writes: one the compiler mistraced (here a step that reads another token)
    is caught, even though its replays agree with it. Each with the fix; an
    honest step passes."""
    from transformers import AutoModelForCausalLM, StaticCache

    from qbench.sdk.hf import COMPILE_TOLERANCE, REPLAY_TOLERANCE, CompiledDecoder

    def gap(problem: str) -> float:
        return float(problem.split(" is ")[1].split(" away")[0])

    def nan_in_cache(token, position):
        out = decoder._decode(token, position)
        decoder.cache.layers[0].keys[0, 0, 0, 0] = float("nan")
        return out

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    decoder = CompiledDecoder(model, "cpu")
    with torch.inference_mode():
        decoder.cache = StaticCache(config=model.config, max_cache_len=24)
        decoder.token = torch.zeros((1, 1), dtype=torch.long)
        decoder.position = torch.zeros(1, dtype=torch.long)
        checks = {}
        # the compiled call, standing in: uncompiled, it is the eager step
        for name, step, stale in (("honest", decoder._decode, False), ("stale", decoder._decode, True),
                                  ("mistraced", lambda token, position: decoder._decode(token + 1, position), False),
                                  ("nan", nan_in_cache, False)):
            decoder.step = step
            checks[name] = decoder._capture_differs(_Replay(decoder, stale=stale))
        decoder.step = decoder._decode
        # A NaN the model itself writes, in every run, is not a difference.
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
        checks["model's nan"] = decoder._capture_differs(_Replay(decoder, stale=False))
    assert checks["honest"] is None and checks["model's nan"] is None
    stale, mistraced = checks["stale"], checks["mistraced"]
    assert stale and "does not redo the step's work" in stale and "use runtime=eager" in stale
    assert gap(stale) > REPLAY_TOLERANCE
    assert "computes another step than the eager model" in mistraced and "use runtime=eager" in mistraced
    assert gap(mistraced) > COMPILE_TOLERANCE
    # a NaN only the compiled call writes is an infinite gap
    assert "computes another step" in checks["nan"] and gap(checks["nan"]) == float("inf")
    # The check leaves the inputs as the capture had them.
    assert decoder.token.item() == 0 and decoder.position.item() == 0
