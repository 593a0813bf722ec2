"""The embedded default model, end to end (slow: converts a 135M model)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_embedded_model_resolves_and_is_cached():
    from qbench.sdk.hf import load_tokenizer
    from qbench.sdk.models import resolve_model

    first = resolve_model("smollm2-135m")
    again = resolve_model("smollm2-135m")
    assert first.path == again.path and first.fingerprint == again.fingerprint
    assert first.source == "embedded" and "Q4_1" in first.note
    tok = load_tokenizer(first.path)
    # The harness never lets the tokenizer add BOS on its own.
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [19556, 905]


def test_smoke_suite_on_the_embedded_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qbench.cli", "run", "--suite", "smoke", "-b", "fp:bf16",
                           "-o", str(tmp_path), "--run-id", "smoke", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "smoke" / "results.jsonl").read_text().splitlines()]
    base, bf16 = records
    assert 5 < base["metrics"]["perplexity"]["value"] < 60
    assert 0 < bf16["metrics"]["kld"]["value"] < 0.02
    assert bf16["metrics"]["same_top_p"]["value"] > 0.9
    assert bf16["metrics"]["weight_bytes"]["value"] < 0.55 * base["metrics"]["weight_bytes"]["value"]


def test_the_conversion_process_keeps_torchaos_deprecation_note_off_the_terminal():
    """The embedded model converts in a spawned process, which prints to the
    user's terminal: torchao's import-time note about torch's enum handling
    (for torchao's authors) stays out of it, as it does in the command's own
    process."""
    probe = "import torch, torchao"
    loud = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    if "Enum subclass" not in loud.stderr:
        pytest.skip("this torch and torchao import without the note")
    # The conversion's own entry point, as the spawned process runs it (on a
    # file that is not there: it stops at the read, after its imports).
    quiet = subprocess.run(
        [sys.executable, "-c", "from qbench.sdk.models import _convert_gguf\n"
         "try:\n    _convert_gguf('/nonexistent/model.gguf', '/nonexistent/out')\n"
         "except Exception as exc:\n    print(type(exc).__name__)\n" + probe],
        capture_output=True, text=True, cwd=REPO)
    assert quiet.returncode == 0 and quiet.stdout.strip(), quiet.stderr  # it did stop at the read
    assert "Enum subclass" not in quiet.stderr, quiet.stderr
