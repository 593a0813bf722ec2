"""The runtime setting (eager or compiled): how the latency workload decodes.
It never changes an artifact, and a runtime a session cannot provide fails
the cell with the reason. The CUDA side is in test_gpu.py."""

from qbench.api import create_run
from qbench.plugins import PluginSettings, load_plugins
from qbench.results import ResultStore
from qbench.runner import execute


def test_runtime_is_a_setting_of_every_backend_outside_the_cache_key():
    loaded = load_plugins(PluginSettings(allow=("builtin",)))
    for backend in loaded.backends.values():
        name, config = next(iter(backend.variants().items()))
        _, compiled = backend.parse_variant(f"{name}:runtime=compiled")
        assert compiled.runtime == "compiled" and config.runtime == "eager"
        assert compiled.cache_settings() == config.cache_settings()  # same artifact


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

    reason = OnnxSession.use_runtime(object.__new__(OnnxSession), "compiled")
    assert "ONNX Runtime runs its own optimised graph" in reason
    assert OnnxSession.use_runtime(object.__new__(OnnxSession), "eager") is None
