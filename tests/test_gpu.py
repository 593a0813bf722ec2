"""CUDA paths: synchronised timing and CUDA memory figures. Skipped without a GPU."""

import pytest
import torch

from qbench.hf import HFSession
from qbench.metrics.cost import latency_metrics, memory_metrics
from qbench.metrics.scoring import score_windows
from qbench.windows import make_windows

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
    assert lat["prefill_ms"]["value"] > 0
    mem = memory_metrics(gpu, "cuda")
    assert mem["cuda_peak_allocated_bytes"]["value"] >= gpu.weight_bytes()


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
    assert [r["cell"] for r in records] == ["fp:fp32", "fp:bf16", "fp:fp16"]
    for r in records:
        m = r["metrics"]
        assert r["env"]["gpu"]["name"]
        assert m["cuda_peak_allocated_bytes"]["value"] >= m["weight_bytes"]["value"]
        assert m["decode_ms_per_token"]["value"] > 0
    assert 0 < records[1]["metrics"]["kld"]["value"] < 0.05
