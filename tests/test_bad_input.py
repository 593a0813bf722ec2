"""Bad input, as a new user (or someone else's suite file) brings it: every
case ends in one clear line naming the problem, a non-zero exit, no
traceback, and no silent or wrong result.

Each case builds its input in a fresh folder and runs the real command line
in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import FAKE_PLUGINS, MC_ITEMS, REPO


@dataclass
class Ctx:
    """What a case can build on."""

    tmp: Path
    model: Path
    suite: Path
    run: Path  # a finished run folder (a copy, free to damage)

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def suite_file(self, body: str, name: str = "s.yaml", **files: str | bytes) -> Path:
        for file, content in files.items():
            self.write(f"suite/{file.replace('__', '.')}", content)
        return self.write(f"suite/{name}", "name: s\n" + textwrap.dedent(body))

    def run_args(self, *extra: str, suite: Optional[Path] = None) -> list[str]:
        return ["run", "--model", str(self.model), "--suite", str(suite or self.suite), "--device", "cpu",
                "-o", str(self.tmp / "out"), *extra]

    def plugin(self, code: str, name: str = "p.py") -> Path:
        folder = self.tmp / "plugins"
        folder.mkdir(exist_ok=True)
        (folder / name).write_text(textwrap.dedent(code))
        return folder


#: A perplexity section the tiny model can score (pydoc topics, 300 tokens).
PPL = "perplexity:\n  corpus: {source: 'builtin:pydoc-topics'}\n  max_tokens: 300\n  max_length: 64\n"
TASK = "tasks:\n  - {name: t, path: t.jsonl}\n"
GOOD_ITEM = json.dumps(MC_ITEMS[0])
LM_EVAL = textwrap.dedent("""\
    task: x
    dataset_path: json
    dataset_kwargs: {data_files: {test: docs.jsonl}}
    output_type: multiple_choice
    doc_to_text: "%s"
    doc_to_choice: "{{options}}"
    doc_to_target: answer
    """)
LM_DOCS = json.dumps({"country": "France", "options": ["Paris", "Rome"], "answer": 0}) + "\n"


def lm_eval_suite(c: Ctx, template: str, **extra) -> list[str]:
    files = {"task__yaml": LM_EVAL % template.replace('"', '\\"'), "docs__jsonl": LM_DOCS, **extra}
    return ["suites", "validate", str(c.suite_file("tasks:\n  - {name: x, path: task.yaml}\n", **files))]


def item_suite(c: Ctx, line: str) -> list[str]:
    return ["suites", "validate", str(c.suite_file(TASK, t__jsonl=line + "\n"))]


def corpus_suite(c: Ctx, name: str, content: str | bytes) -> list[str]:
    body = f"perplexity:\n  corpus: {{source: {name}}}\n"
    return ["suites", "validate", str(c.suite_file(body, **{name.replace(".", "__"): content}))]


def corrupt_results(c: Ctx, line: str) -> Path:
    with open(c.run / "results.jsonl", "a") as handle:
        handle.write(line + "\n")
    return c.run


def other_suite_run(c: Ctx) -> Path:
    other = c.tmp / "other"
    shutil.copytree(c.run, other)
    plan = json.loads((other / "plan.json").read_text())
    plan["suite_hash"], plan["suite_name"] = "0123456789abcdef", "capitals"
    (other / "plan.json").write_text(json.dumps(plan))
    return other


def symlink_out(c: Ctx) -> list[str]:
    suite = c.suite_file(TASK)
    outside = c.write("elsewhere/secret.jsonl", GOOD_ITEM + "\n")
    os.symlink(outside, suite.parent / "t.jsonl")
    return ["suites", "validate", str(suite)]


def existing(folder: Path) -> str:
    folder.mkdir(parents=True)
    return folder.name


def no_tokenizer_model(c: Ctx) -> list[str]:
    folder = c.tmp / "model"
    folder.mkdir()
    for f in c.model.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)
    return ["run", "--model", str(folder), "--suite", str(c.suite), "-o", str(c.tmp / "out")]


def yaml_bomb(levels: int = 7, width: int = 9) -> str:
    """A "billion laughs" flow mapping: 9^7 leaves from 54 aliases in 300 bytes."""
    rows = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    rows += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "{" + ", ".join(rows) + "}"


def newer_record(c: Ctx) -> str:
    record = json.loads((c.run / "results.jsonl").read_text().splitlines()[0])
    from qbench.core.records import SCHEMA_VERSION

    return json.dumps({**record, "schema": SCHEMA_VERSION + 1, "kv_cache": "q8_0"})


def unknown_field(c: Ctx) -> str:
    record = json.loads((c.run / "results.jsonl").read_text().splitlines()[0])
    return json.dumps({**record, "surprise": 1})


def link_to_results(c: Ctx) -> list[str]:
    link = c.tmp / "export.csv"
    os.symlink(c.run / "results.jsonl", link)
    return ["export", str(c.run), "--csv", str(link), "--force"]


def empty_weights_model(c: Ctx) -> list[str]:
    folder = c.tmp / "model"
    shutil.copytree(c.model, folder)
    (folder / "model.safetensors").write_bytes(b"")
    return ["run", "--model", str(folder), "--suite", str(c.suite), "--device", "cpu", "-o", str(c.tmp / "out")]


def empty_gguf(c: Ctx) -> Path:
    """A valid GGUF file with no metadata and no tensors."""
    import gguf

    path = c.tmp / "empty.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.kv_data[0].pop("general.architecture", None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def swapped_embedded_model(c: Ctx) -> list[str]:
    """Another model's folder where the embedded model's conversion lies."""
    from qbench.core.paths import cache_dir
    from qbench.sdk.models import DEFAULT_MODEL, EMBEDDED_MARKER, embedded_gguf

    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{embedded_gguf().stat().st_size}"
    shutil.copytree(c.model, target)
    (target / EMBEDDED_MARKER).write_text(json.dumps({"gguf": embedded_gguf().name, "fingerprint": "0" * 16}))
    return ["run", "--suite", str(c.suite), "--device", "cpu", "-o", str(c.tmp / "out")]


def relative_budget_few_items(c: Ctx) -> list[str]:
    suite = c.suite_file(PPL + TASK, t__jsonl=GOOD_ITEM + "\n")
    return ["search", "--budget", "acc>=0.99*base", "-m", str(c.model), "-s", str(suite), "--device", "cpu",
            "-o", str(c.tmp / "out")]


# (id, build(ctx) -> argv, expected exit code, text the error line must hold)
CASES: list[tuple[str, Callable[[Ctx], list[str]], int, str]] = [
    # -- the run command's options
    ("unknown-backend", lambda c: c.run_args("-b", "nosuch"), 2, "unknown backend 'nosuch'"),
    ("unknown-variant", lambda c: c.run_args("-b", "fp:int2"), 2, "unknown variant 'int2'"),
    ("bad-setting", lambda c: c.run_args("-b", "fp:dtype=int3"), 2, "dtype"),
    ("misspelled-setting", lambda c: c.run_args("-b", "fp:dtyp=bf16"), 2, "dtyp"),
    ("compile-mode-eager", lambda c: c.run_args("-b", "fp:bf16:compile_mode=reduce-overhead"), 2,
     "compile_mode applies to runtime=compiled only"),
    ("sensitivity-no-layer-selection", lambda c: ["sensitivity", "-b", "fp:bf16", "-m", str(c.model), "-s",
                                                  str(c.suite), "--device", "cpu", "-o", str(c.tmp / "out")], 2,
     "backend 'fp' cannot quantize one layer at a time"),
    ("sensitivity-no-variant", lambda c: ["sensitivity", "-b", "torchao", "-m", str(c.model), "-s", str(c.suite),
                                          "--device", "cpu", "-o", str(c.tmp / "out")], 2,
     "name one variant for sensitivity, like 'torchao:"),
    ("recipe-missing", lambda c: c.run_args("-b", f"torchao:recipe={c.tmp / 'none.yaml'}"), 2,
     "recipe file"),
    ("recipe-not-yaml", lambda c: c.run_args("-b", f"torchao:recipe={c.write('r.yaml', 'base: [x')}"), 2,
     "not valid YAML"),
    ("recipe-both-actions", lambda c: c.run_args("-b", "torchao:recipe=" + str(c.write(
        "r.yaml", "base: int4-wo-g32\noverrides:\n  - {match: '*', keep: true, use: int8-wo}\n"))), 2,
     "exactly one of 'keep: true' or 'use: VARIANT'"),
    ("recipe-unknown-base", lambda c: c.run_args("-b", "torchao:recipe=" + str(c.write("r.yaml", "base: int3\n"))),
     2, "unknown variant 'int3'"),
    ("recipe-mixed-devices", lambda c: c.run_args("-b", "torchao:recipe=" + str(c.write(
        "r.yaml", "base: int4-wo-g32\noverrides:\n  - {match: '*.v_proj', use: float8-wo}\n"))), 2,
     "a recipe mixes variants of one compute dtype and device"),
    ("recipe-beside-settings", lambda c: c.run_args("-b", "torchao:int8-wo:recipe=" + str(c.write(
        "r.yaml", "base: int4-wo-g32\n"))), 2, "give the recipe alone"),
    ("recipe-names-itself", lambda c: c.run_args("-b", "torchao:recipe=" + str(c.write(
        "r.yaml", f"base: recipe={c.tmp / 'r.yaml'}\n"))), 2, "names a recipe"),
    ("search-bad-budget", lambda c: ["search", "--budget", "kld<0.05", "-m", str(c.model), "-s", str(c.suite),
                                     "-o", str(c.tmp / "out")], 2, "budget 'kld<0.05' is not understood"),
    ("search-budget-direction", lambda c: ["search", "--budget", "kld>=0.05", "-m", str(c.model), "-s",
                                           str(c.suite), "-o", str(c.tmp / "out")], 2, "kld takes '<='"),
    ("search-budget-size-unit", lambda c: ["search", "--budget", "weights<=12 parsecs", "-m", str(c.model), "-s",
                                           str(c.suite), "-o", str(c.tmp / "out")], 2, "MiB, GiB, MB or GB"),
    ("calibration-on-uncalibrated", lambda c: c.run_args("-b", "fp:bf16:calibration=code"), 2,
     "this variant does not calibrate"),
    ("calibration-set-unknown", lambda c: c.run_args("-b", "torchao:int8-static:calibration=nosuch"), 2,
     "has no calibration set 'nosuch'"),
    ("calibration-set-bad-name", lambda c: c.run_args("-b", "torchao:int8-static:calibration=a/b"), 2,
     "calibration"),
    ("timeout-nan", lambda c: c.run_args("--cell-timeout", "nan"), 2, "not a finite number"),
    ("timeout-inf", lambda c: c.run_args("--cell-timeout", "inf"), 2, "not a finite number"),
    ("timeout-negative", lambda c: c.run_args("--cell-timeout", "-5"), 2, "--cell-timeout"),
    ("timeout-text", lambda c: c.run_args("--cell-timeout", "soon"), 2, "--cell-timeout"),
    ("threads-zero", lambda c: c.run_args("--threads", "0"), 2, "--threads"),
    ("threads-negative", lambda c: c.run_args("--threads", "-2"), 2, "--threads"),
    ("run-id-escapes", lambda c: c.run_args("--run-id", "../escaped"), 2, "not a plain name"),
    ("run-id-slash", lambda c: c.run_args("--run-id", "a/b"), 2, "not a plain name"),
    ("run-id-markup", lambda c: c.run_args("--run-id", "x[/]"), 2, "'x[/]' is not a plain name"),
    ("run-id-empty", lambda c: c.run_args("--run-id", ""), 2, "not a plain name"),
    ("device-unknown", lambda c: c.run_args("--device", "tpu"), 2, "'tpu' is not one of"),
    ("device-cuda-absent", lambda c: c.run_args("--device", "cuda"), 2, "no CUDA"),
    ("baseline-no-variant", lambda c: c.run_args("--baseline", "fp"), 2, "--baseline must be backend:variant"),
    ("baseline-unknown", lambda c: c.run_args("--baseline", "nosuch:x"), 2, "unknown backend 'nosuch'"),
    ("retry-without-resume", lambda c: c.run_args("--retry-failed"), 2, "only makes sense with --resume"),
    ("suite-unknown-name", lambda c: c.run_args(suite=Path("nosuchsuite")), 2, "suite 'nosuchsuite' not found"),
    ("unknown-option", lambda c: c.run_args("--bogus"), 2, "No such option '--bogus'"),
    # -- models
    ("model-missing", lambda c: c.run_args()[:1] + ["--model", str(c.tmp / "nope")] + c.run_args()[3:], 2,
     "not found"),
    ("model-not-a-folder", lambda c: ["run", "--model", str(c.write("m.txt", "x")), "--suite", str(c.suite),
                                      "-o", str(c.tmp)], 2, "has no config.json"),
    ("model-config-only", lambda c: ["run", "--model", str(c.write("m/config.json", "{}").parent), "--suite",
                                     str(c.suite), "-o", str(c.tmp)], 2, "has no weight files"),
    ("model-no-tokenizer", no_tokenizer_model, 2, "cannot load a tokenizer"),
    ("model-bad-hub-id", lambda c: c.run_args()[:1] + ["--model", "not a valid/id here"] + c.run_args()[3:], 2,
     "not a valid/id here"),
    # -- resume
    ("resume-unknown", lambda c: ["run", "--resume", "nosuchrun"], 2, "run 'nosuchrun' not found"),
    ("resume-with-backends", lambda c: ["run", "--resume", str(c.run), "-b", "fp"], 2, "drop --backends"),
    ("resume-with-device", lambda c: ["run", "--resume", str(c.run), "--device", "cuda"], 2, "drop --device"),
    ("resume-with-suite", lambda c: ["run", "--resume", str(c.run), "-s", "smoke"], 2, "drop --suite"),
    ("resume-with-model", lambda c: ["run", "--resume", str(c.run), "-m", "x/y"], 2, "drop --model"),
    ("resume-corrupt-plan", lambda c: (c.run / "plan.json").write_text("{") and ["run", "--resume", str(c.run)],
     2, "plan.json is unreadable"),
    # -- plugins
    ("plugins-dir-missing", lambda c: c.run_args("--plugins-dir", str(c.tmp / "none")), 2, "plugins folder not found"),
    ("plugin-system-exit", lambda c: c.run_args("--plugins-dir", str(c.plugin("raise SystemExit(0)\n"))), 2,
     "failed to import: SystemExit"),
    ("plugin-syntax-error", lambda c: c.run_args("--plugins-dir", str(c.plugin("def (:\n"))), 2,
     "failed to import: SyntaxError"),
    ("plugin-misspelled-hook", lambda c: c.run_args("--plugins-dir", str(c.plugin(
        "from qbench import hookimpl\n@hookimpl\ndef register_backend(register):\n    pass\n"))), 2,
     "unknown hook 'register_backend'"),
    ("plugin-registers-junk", lambda c: c.run_args("--plugins-dir", str(c.plugin(
        "from qbench import hookimpl\n@hookimpl\ndef register_backends(register):\n    register(42)\n"))), 2,
     "which is not a qbench Backend"),
    ("plugin-raises-in-hook", lambda c: c.run_args("--plugins-dir", str(c.plugin(
        "from qbench import hookimpl\n@hookimpl\ndef register_backends(register):\n    1/0\n"))), 2,
     "failed in register_backends: ZeroDivisionError"),
    ("plugin-duplicate-name", lambda c: c.run_args("--plugins-dir", str(FAKE_PLUGINS), "--plugins-dir", str(c.plugin(
        (FAKE_PLUGINS / "qbench_fakes.py").read_text(), "again.py"))), 2, "registered twice"),
    # -- show, report, compare, export on damaged or mismatched runs
    ("show-unknown", lambda c: ["show", "nosuchrun"], 2, "run 'nosuchrun' not found"),
    ("show-corrupt-plan", lambda c: (c.run / "plan.json").write_text("[]") and ["show", str(c.run)], 2,
     "plan.json is unreadable"),
    ("show-line-not-a-record", lambda c: ["show", str(corrupt_results(c, '{"foo": 1}'))], 2, "not a qbench record"),
    ("show-line-not-json", lambda c: ["show", str(corrupt_results(c, "garbage"))], 2, "results.jsonl:3"),
    ("show-wrong-type", lambda c: ["show", str(corrupt_results(c, (c.run / "results.jsonl").read_text().splitlines()[0]
                                                                .replace('"status":"ok"', '"status":"maybe"')))],
     2, "status"),
    ("compare-line-is-a-list", lambda c: ["compare", str(c.run), str(corrupt_results(c, "[1, 2]"))], 2,
     "not a qbench record"),
    ("compare-different-suites", lambda c: ["compare", str(c.run), str(other_suite_run(c))], 2,
     "used different suites"),
    ("compare-unknown-run", lambda c: ["compare", str(c.run), "nosuchrun"], 2, "run 'nosuchrun' not found"),
    ("report-corrupt-plan", lambda c: (c.run / "plan.json").write_text("{") and ["report", str(c.run)], 2,
     "plan.json is unreadable"),
    ("report-no-records", lambda c: (c.run / "results.jsonl").write_text("") or ["report", str(c.run)], 2,
     "has no finished cell yet"),
    ("report-budget-nan", lambda c: ["report", str(c.run), "--kld-budget", "nan"], 2, "not a finite number"),
    ("report-budget-negative", lambda c: ["report", str(c.run), "--kld-budget", "-1"], 2, "--kld-budget"),
    ("export-parquet-no-folder", lambda c: ["export", str(c.run), "--parquet", "/nonexistent_dir/x.parquet"], 2,
     "folder /nonexistent_dir does not exist"),
    ("export-csv-no-folder", lambda c: ["export", str(c.run), "--csv", str(c.tmp / "no" / "x.csv")], 2,
     "does not exist"),
    # -- suite files
    ("suite-missing-file", lambda c: ["suites", "validate", str(c.tmp / "none.yaml")], 2, "does not exist"),
    ("suite-not-yaml", lambda c: ["suites", "validate", str(c.write("s.yaml", "name: x\ntasks: [\n"))], 2,
     "not valid YAML"),
    ("suite-is-a-list", lambda c: ["suites", "validate", str(c.write("s.yaml", "- 1\n- 2\n"))], 2,
     "must be a YAML mapping"),
    ("suite-binary", lambda c: ["suites", "validate", str(c.write("s.yaml", b"\x00\x01\x02name"))], 2,
     "binary file"),
    ("suite-no-name", lambda c: ["suites", "validate", str(c.write("s.yaml", PPL))], 2, "field 'name'"),
    ("suite-typo-field", lambda c: ["suites", "validate", str(c.suite_file("perplexty: {}\n"))], 2,
     "field 'perplexty'"),
    ("suite-negative-length", lambda c: ["suites", "validate", str(c.suite_file(PPL + "  batch_size: -1\n"))], 2,
     "perplexity.batch_size"),
    ("suite-latency-without-text", lambda c: ["suites", "validate", str(c.suite_file("latency: {}\n"))], 2,
     "latency prompts are cut from the perplexity corpus"),
    ("suite-bad-doc-range", lambda c: ["suites", "validate", str(c.suite_file(
        "perplexity:\n  corpus: {source: 'builtin:pydoc-topics', documents: [0.5, 0.2]}\n"))], 2, "documents range"),
    ("suite-bad-bos", lambda c: ["suites", "validate", str(c.suite_file("bos: maybe\n"))], 2, "field 'bos'"),
    ("suite-task-missing", lambda c: ["suites", "validate", str(c.suite_file(TASK))], 2, "data file not found"),
    ("suite-reads-etc-passwd", lambda c: ["suites", "validate", str(c.suite_file(
        "tasks:\n  - {name: t, path: ../../../../../../etc/passwd}\n"))], 2, "outside the suite's folder"),
    ("suite-absolute-corpus", lambda c: ["suites", "validate", str(c.suite_file(
        "perplexity:\n  corpus: {source: /etc/hostname}\n"))], 2, "outside the suite's folder"),
    ("suite-symlink-out", symlink_out, 2, "outside the suite's folder"),
    ("suite-outside-in-run", lambda c: c.run_args(suite=c.suite_file(
        "perplexity:\n  corpus: {source: /etc/hostname}\n")), 2, "--allow-outside-data"),
    ("suite-unknown-builtin", lambda c: ["suites", "validate", str(c.suite_file(
        "perplexity:\n  corpus: {source: 'builtin:nosuch'}\n"))], 2, "unknown corpus source 'builtin:nosuch'"),
    ("suite-bad-hub-source", lambda c: c.run_args(suite=c.suite_file(
        "perplexity:\n  corpus: {source: 'hf:onlyname'}\n")), 2, "expected hf:DATASET:SPLIT"),
    ("suite-name-markup", lambda c: ["suites", "validate", str(c.write("s.yaml", "name: '[/]evil'\ntasks: oops\n"))],
     2, "field 'tasks'"),
    ("suite-duplicate-task", lambda c: ["suites", "validate", str(c.suite_file(
        TASK + "  - {name: t, path: t.jsonl}\n", t__jsonl=GOOD_ITEM + "\n"))], 2, "task name 't' is used twice"),
    ("suite-empty-prompt", lambda c: ["suites", "validate", str(c.suite_file("generation: {prompts: ['']}\n"))], 2,
     "field 'generation.prompts.0'"),
    ("suite-stride-too-long", lambda c: ["suites", "validate", str(c.suite_file(PPL + "  stride: 100\n"))], 2,
     "stride 100 is longer than max_length 64"),
    ("calibration-too-short", lambda c: c.run_args(suite=c.suite_file(
        PPL + "calibration: {corpus: {source: c.txt}, samples: 4, seq_len: 32}\n", c__txt="a few words only")), 2,
     "the calibration corpus gives 0 of the 4 samples"),
    ("suite-batch-twice", lambda c: ["suites", "validate", str(c.suite_file(PPL + "latency: {batch_size: [1, 1]}\n"))],
     2, "batch_size lists a size twice"),
    ("suite-batch-empty", lambda c: ["suites", "validate", str(c.suite_file(PPL + "latency: {batch_size: []}\n"))],
     2, "latency.batch_size"),
    # -- task files (qbench's JSONL)
    ("task-not-json", lambda c: item_suite(c, "{context: nope"), 2, "t.jsonl:1: not JSON"),
    ("task-fractional-gold", lambda c: item_suite(c, '{"context": "a", "choices": ["b", "c"], "gold": 1.9}'), 2,
     "field 'gold'"),
    ("task-empty-choice", lambda c: item_suite(c, '{"context": "a", "choices": ["b", ""], "gold": 0}'), 2,
     "a choice is empty"),
    ("task-integer-choices", lambda c: item_suite(c, '{"context": "a", "choices": [1, 2], "gold": 0}'), 2,
     "field 'choices.0'"),
    ("task-gold-out-of-range", lambda c: item_suite(c, '{"context": "a", "choices": ["b", "c"], "gold": 2}'), 2,
     "gold index 2 is not among the 2 choices"),
    ("task-one-choice", lambda c: item_suite(c, '{"context": "a", "choices": ["b"], "gold": 0}'), 2,
     "field 'choices'"),
    ("task-integer-context", lambda c: item_suite(c, '{"context": 5, "choices": ["b", "c"], "gold": 0}'), 2,
     "field 'context'"),
    ("task-boolean-gold", lambda c: item_suite(c, '{"context": "a", "choices": ["b", "c"], "gold": true}'), 2,
     "field 'gold'"),
    ("task-is-a-list", lambda c: item_suite(c, "[1, 2]"), 2, "expected a JSON object"),
    ("task-empty-file", lambda c: item_suite(c, ""), 2, "holds no items"),
    ("task-binary", lambda c: ["suites", "validate", str(c.suite_file(TASK, t__jsonl=b"\x00\xff\x00"))], 2,
     "binary file"),
    # -- task files (lm-eval format): templates run sandboxed
    ("lm-eval-os-system", lambda c: lm_eval_suite(
        c, "{{ cycler.__init__.__globals__.os.system('touch %s') }} Q" % (c.tmp / "pwned")), 2,
     "field 'doc_to_text': template refused by the sandbox"),
    ("lm-eval-mro", lambda c: lm_eval_suite(c, "{{ ''.__class__.__mro__ }}"), 2, "refused by the sandbox"),
    ("lm-eval-repeat-bomb", lambda c: lm_eval_suite(c, "{{ 'x' * 1000000000 }}"), 2, "refused by the sandbox"),
    ("lm-eval-power-bomb", lambda c: lm_eval_suite(c, "{{ 9 ** 9 ** 9 }}"), 2, "refused by the sandbox"),
    ("lm-eval-undefined", lambda c: lm_eval_suite(c, "{{ nosuchfield }}"), 2, "'nosuchfield' is undefined"),
    ("lm-eval-function", lambda c: ["suites", "validate", str(c.suite_file(
        "tasks:\n  - {name: x, path: task.yaml}\n", task__yaml="task: x\ndoc_to_text: !function utils.f\n"))], 2,
     "runs Python from the task"),
    ("lm-eval-data-outside", lambda c: ["suites", "validate", str(c.suite_file(
        "tasks:\n  - {name: x, path: task.yaml}\n", task__yaml=(LM_EVAL % "Q").replace(
            "docs.jsonl", "../../../../../../etc/hostname")))], 2, "outside the suite's folder"),
    # -- the lm_eval section: lm-evaluation-harness runs these tasks
    ("lm-eval-engine-unknown-task", lambda c: c.run_args(suite=c.suite_file(
        "lm_eval: {tasks: ['lm_eval:no_such_task_here']}\n")), 2, "lm-eval has no task 'no_such_task_here'"),
    ("lm-eval-engine-function", lambda c: c.run_args(suite=c.suite_file(
        "lm_eval: {tasks: [task.yaml]}\n", task__yaml="task: x\ndoc_to_text: !function utils.f\n")), 2,
     "run with --trust-task-code"),
    ("lm-eval-engine-remote-dataset-code", lambda c: c.run_args(suite=c.suite_file(
        "lm_eval: {tasks: [task.yaml]}\n",
        task__yaml="task: x\ndataset_path: someone/data\ndataset_kwargs: {trust_remote_code: true}\n")), 2,
     "trust_remote_code runs the dataset's own script"),
    ("lm-eval-engine-local-data-unlisted", lambda c: ["suites", "validate", str(c.suite_file(
        "lm_eval: {tasks: ['lm_eval:arithmetic_2da'], local_data: {arithmetic_2ds: d.jsonl}}\n"))], 2,
     "local_data names 'arithmetic_2ds'"),
    ("lm-eval-engine-no-name", lambda c: ["suites", "validate", str(c.suite_file(
        "lm_eval: {tasks: ['lm_eval:']}\n"))], 2, "needs a task name"),
    ("stride-with-rolling", lambda c: ["suites", "validate", str(c.suite_file(
        "perplexity:\n  corpus: {source: 'builtin:pydoc-topics'}\n  protocol: lm-eval-rolling\n  stride: 8\n"))], 2,
     "stride applies to the stream protocol only"),
    # -- corpora
    ("corpus-empty", lambda c: corpus_suite(c, "c.txt", "\n\n  \n"), 2, "holds no text"),
    ("corpus-binary", lambda c: corpus_suite(c, "c.txt", b"abc\x00\x01" * 10), 2, "binary file"),
    ("corpus-latin1", lambda c: corpus_suite(c, "c.txt", "caf\xe9".encode("latin-1")), 2, "not UTF-8"),
    ("corpus-non-string", lambda c: corpus_suite(c, "c.jsonl", '{"text": 42}\n'), 2, "'text' string"),
    ("corpus-missing-field", lambda c: corpus_suite(c, "c.jsonl", '{"body": "x"}\n'), 2, "'text' string"),
    ("corpus-one-token", lambda c: c.run_args(suite=c.suite_file(
        "perplexity:\n  corpus: {source: c.txt}\n", c__txt="a")), 2, "scored token"),
    ("windows-past-positions", lambda c: c.run_args(suite=c.suite_file(
        "perplexity:\n  corpus: {source: 'builtin:pydoc-topics'}\n  max_length: 600\n  max_tokens: 1300\n")), 2,
     "needs 599 positions but the model has 512"),
    ("latency-past-positions", lambda c: c.run_args(suite=c.suite_file(
        PPL + "latency: {prompt_tokens: 200, new_tokens: 400}\n")), 2, "needs 600 positions"),
    ("latency-prompt-too-long", lambda c: c.run_args(suite=c.suite_file(
        PPL + "latency: {prompt_tokens: 400, new_tokens: 4}\n")), 2, "latency.prompt_tokens is 400"),
    ("generation-past-positions", lambda c: c.run_args(suite=c.suite_file(
        PPL + "generation: {prompts: ['Hi'], max_new_tokens: 600}\n")), 2, "generation"),
    # -- results and cache folders
    ("results-under-a-file", lambda c: ["run", "--model", str(c.model), "--suite", str(c.suite), "-o",
                                        str(c.write("f", "x") / "runs")], 2, "results folder"),
    ("results-unwritable", lambda c: ["run", "--model", str(c.model), "--suite", str(c.suite), "-o",
                                      "/proc/qbench-results"], 2, "is not writable"),
    ("cache-unwritable", lambda c: c.run_args("-b", "fp:bf16") if c.write("cachefile", "x") else [], 2,
     "artifact cache"),
    ("run-folder-exists", lambda c: c.run_args("--run-id", existing(c.tmp / "out" / "dup")), 2, "already exists"),
    # -- no command writes over a run's own files (results, plan, reference, pending, logs) or, unasked, any file
    ("export-over-results", lambda c: ["export", str(c.run), "--csv", str(c.run / "results.jsonl")], 2,
     "refusing to write"),
    ("export-over-plan-forced", lambda c: ["export", str(c.run), "--parquet", str(c.run / "plan.json"), "--force"],
     2, "refusing to write"),
    ("export-over-reference", lambda c: ["export", str(c.run), "--csv", str(next((c.run / "reference").iterdir())),
                                         "--force"], 2, "refusing to write"),
    ("export-through-a-link", link_to_results, 2, "refusing to write"),
    ("export-over-a-file", lambda c: ["export", str(c.run), "--csv", str(c.write("mine.csv", "keep me"))], 2,
     "already exists"),
    ("export-into-a-folder", lambda c: ["export", str(c.run), "--csv", str(c.tmp)], 2, "is a directory"),
    ("export-same-file-twice", lambda c: ["export", str(c.run), "--csv", str(c.tmp / "x"), "--parquet",
                                          str(c.tmp / "x")], 2, "the same file"),
    ("sensitivity-recipe-over-results", lambda c: ["sensitivity", "-b", "torchao:int8-wo", "-m", str(c.model), "-s",
                                                   str(c.suite), "--device", "cpu", "-o", str(c.tmp / "out"),
                                                   "--recipe", str(c.run / "results.jsonl"), "--force"], 2,
     "refusing to write"),
    ("report-folder-blocked", lambda c: (shutil.rmtree(c.run / "report_files", ignore_errors=True),
                                         c.write("run/report_files", "a file")) and ["report", str(c.run)], 2,
     "cannot write the report"),
    # -- records and cache entries: what cannot be read is named, never advised away
    ("show-newer-schema", lambda c: ["show", str(corrupt_results(c, newer_record(c)))], 2,
     "written by a newer qbench (record schema 5"),
    ("show-unknown-field", lambda c: ["show", str(corrupt_results(c, unknown_field(c)))], 2,
     "restore it from a copy"),
    ("cache-unwritable-embedded", lambda c: ["run", "--suite", str(c.suite), "--device", "cpu", "-o",
                                             str(c.tmp / "out")] if c.write("cachefile", "x") else [], 2,
     "the cache folder is not writable"),
    # -- inputs checked when the run is planned, before the baseline runs
    ("embedded-model-swapped", swapped_embedded_model, 2, "is not what its conversion wrote"),
    ("cell-memory-nan", lambda c: c.run_args("--executor", "ray", "--cell-memory", "nan"), 2, "not a finite number"),
    ("model-empty-safetensors", empty_weights_model, 2, "not a readable safetensors file"),
    ("gguf-no-architecture", lambda c: c.run_args("-b", f"gguf:prequantized:path={empty_gguf(c)}"), 2,
     "without general.architecture"),
    ("gguf-file-missing", lambda c: c.run_args("-b", f"gguf:prequantized:path={c.tmp / 'none.gguf'}"), 2,
     "gguf:prequantized:path="),
    ("recipe-matches-nothing", lambda c: c.run_args("-b", "torchao:recipe=" + str(c.write(
        "r.yaml", "base: int8-wo\noverrides:\n  - {match: '*.dwon_proj', keep: true}\n"))), 2,
     "matches none of the model's 14 linear layers; closest names"),
    ("search-relative-few-items", relative_budget_few_items, 2, "at least 20 needed"),
    # -- untrusted files: bounded work
    ("recipe-alias-bomb", lambda c: c.run_args("-b", "torchao:recipe=" + str(c.write(
        "r.yaml", f"base: int8-wo\nsource: {yaml_bomb()}\n"))), 2, "a YAML bomb?"),
    ("suite-alias-bomb", lambda c: ["suites", "validate", str(c.write("s.yaml", f"name: s\nx: {yaml_bomb()}\n"))],
     2, "a YAML bomb?"),
    ("suite-many-aliases", lambda c: ["suites", "validate", str(c.write(
        "s.yaml", "name: &n s\nx: [" + ", ".join(["*n"] * 101) + "]\n"))], 2, "more than 100 aliases"),
    ("suite-too-large", lambda c: ["suites", "validate", str(c.write(
        "s.yaml", "name: s\ndescription: '" + "x" * (5 * 2**20) + "'\n"))], 2, "larger than 4 MiB"),
    ("task-alias-bomb", lambda c: ["suites", "validate", str(c.suite_file(
        "tasks:\n  - {name: x, path: task.yaml}\n", task__yaml=f"task: x\nbomb: {yaml_bomb()}\n"))], 2,
     "a YAML bomb?"),
    ("lm-eval-join-bomb", lambda c: lm_eval_suite(c, "{{ (country*166)|list|join(country*166666) }}"), 2,
     "needs more than 256 MiB to render"),
    ("lm-eval-loop-bomb", lambda c: lm_eval_suite(
        c, "{% for i in range(10000) %}{% for j in range(10000) %}{{ country }}{% endfor %}{% endfor %}"), 2,
     "renders more than 1,000,000 characters"),
    ("lm-eval-endless-loop", lambda c: lm_eval_suite(
        c, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"), 2,
     "took longer than 2 s"),
    ("suite-deep-nesting", lambda c: ["suites", "validate", str(c.write(
        "s.yaml", "name: s\nx: " + "[" * 5000 + "]" * 5000 + "\n"))], 2, "nests deeper than 100 levels"),
    ("suite-latency-forever", lambda c: ["suites", "validate", str(c.suite_file(
        PPL + "latency: {min_seconds: 1000000000}\n"))], 2, "latency.min_seconds"),
    ("lm-eval-deep-template", lambda c: lm_eval_suite(c, "{{ " + "(" * 5000 + "country" + ")" * 5000 + " }}"), 2,
     "nests too deeply to parse"),
    ("lm-eval-recursive-macro", lambda c: lm_eval_suite(
        c, "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"), 2, "recurses too deeply"),
    ("show-deeply-nested-line", lambda c: ["show", str(corrupt_results(c, "[" * 100000 + "]" * 100000))], 2,
     "nests too deeply to be a record"),
    ("sensitivity-into-a-run", lambda c: ["sensitivity", "-b", "torchao:int8-wo", "-m", str(c.model), "-s",
                                          str(c.suite), "--device", "cpu", "-o", str(c.tmp), "--run-id", "run"], 2,
     "is a run folder (it holds plan.json)"),
    # -- validate runs every check that planning runs
    ("validate-no-scored-tokens", lambda c: ["suites", "validate", str(c.suite_file(
        "perplexity:\n  corpus: {source: c.txt}\n", c__txt="a"))], 2, "scored token"),
    ("validate-lm-eval-function", lambda c: ["suites", "validate", str(c.suite_file(
        "lm_eval: {tasks: [task.yaml]}\n", task__yaml="task: x\ndoc_to_text: !function utils.f\n"))], 2,
     "run with --trust-task-code"),
    ("validate-lm-eval-remote-code", lambda c: ["suites", "validate", str(c.suite_file(
        "lm_eval: {tasks: [task.yaml]}\n",
        task__yaml="task: x\ndataset_path: someone/data\ndataset_kwargs: {trust_remote_code: true}\n"))], 2,
     "trust_remote_code runs the dataset's own script"),
    ("validate-lm-eval-include-outside", lambda c: ["suites", "validate", str(c.suite_file(
        "lm_eval: {tasks: [task.yaml]}\n", task__yaml="include: ../../../../../../etc/hostname\ntask: x\n"))], 2,
     "outside the suite's folder"),
    ("validate-lm-eval-include-cycle", lambda c: ["suites", "validate", str(c.suite_file(
        "lm_eval: {tasks: [task.yaml]}\n", task__yaml="include: task.yaml\ntask: x\n"))], 2, "include cycle"),
    ("validate-windows-past-positions", lambda c: ["suites", "validate", str(c.suite_file(
        "perplexity:\n  corpus: {source: 'builtin:pydoc-topics'}\n  max_length: 600\n  max_tokens: 1300\n"))], 2,
     "needs 599 positions but the model has 512"),
]


@pytest.fixture(scope="module")
def finished(tiny_model, tiny_suite, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-input-runs")
    proc = subprocess.run([sys.executable, "-m", "qbench.cli", *["run", "--model", str(tiny_model), "--suite",
                           str(tiny_suite), "--device", "cpu", "-b", "fake:uniform", "--plugins-dir",
                           str(FAKE_PLUGINS), "-o", str(out), "--run-id", "done"]],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out / "done"


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under a run folder but the ones a refused command may
    itself damage in the test (results.jsonl and plan.json are damaged on
    purpose by some cases, before the command runs)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def qbench_cli(args: list[str], cwd: Path, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, text: str) -> str:
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything, everything
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, everything
    assert len(lines) == 1 and lines[0].startswith("error: "), everything
    assert text in lines[0], lines[0]
    if os.environ.get("QBENCH_SHOW_ERRORS"):
        print(lines[0])
    return lines[0]


@pytest.mark.parametrize("build,code,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(build, code, text, tiny_model, tiny_suite, finished, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(finished, run_copy)
    ctx = Ctx(tmp=tmp_path, model=tiny_model, suite=tiny_suite, run=run_copy)
    args = build(ctx)
    if args[:2] == ["suites", "validate"]:  # checked against the tiny model, as the run cases are
        args += ["--model", str(tiny_model)]
    before = folder_bytes(run_copy)
    env = {"QBENCH_RESULTS": str(tmp_path / "results")}
    if (tmp_path / "cachefile").exists():
        env["QBENCH_CACHE"] = str(tmp_path / "cachefile" / "cache")  # under a file: nothing can be written
    proc = qbench_cli(args, cwd=tmp_path, env=env)
    assert_one_line_error(proc, code, text)
    # A refused command loses nothing: the run's records, plan and reference are as they were.
    after = folder_bytes(run_copy)
    assert {k: v for k, v in after.items() if k in before} == {k: v for k, v in before.items() if k in after}
    assert set(before) <= set(after), set(before) - set(after)
    assert not (tmp_path / "pwned").exists()  # no template ever ran code
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_user_text_is_never_read_as_markup(tiny_model, tmp_path):
    """Rich markup in a suite name or run id is printed as written, not
    interpreted (a stray ``[/]`` used to crash the printer)."""
    folder = tmp_path / "suite"
    folder.mkdir()
    suite = folder / "evil.yaml"
    suite.write_text("name: '[/]evil [bold]x'\n" + PPL)
    proc = qbench_cli(["suites", "validate", str(suite), "--model", str(tiny_model)], cwd=tmp_path)
    assert proc.returncode == 0 and "suite '[/]evil [bold]x'" in proc.stdout, proc.stderr
    proc = qbench_cli(["run", "--model", str(tiny_model), "--suite", str(suite), "--device", "cpu", "-b", "fp:bf16",
                       "-o", str(tmp_path / "out"), "--run-id", "r-1.x_y"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "suite [/]evil [bold]x" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


BOMBS = {"join": "{{ (country*166)|list|join(country*166666) }}",
         "loops": "{% for i in range(10000) %}{% for j in range(10000) %}{{ country }}{% endfor %}{% endfor %}",
         "silent-loops": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"}


@pytest.mark.parametrize("name", list(BOMBS))
def test_template_bombs_are_refused_within_a_bounded_budget(name, tmp_path):
    """The 1,000,000-character cap was once checked after rendering: the
    join bomb built 995M characters (2.5 GB), the loops took 5 s and 1.4 GB.
    Measured in a child process that imports only what renders templates:
    its peak RSS stays under 300 MB and the render returns within 3 s."""
    # A process started from pytest's inherits its peak RSS through exec (Linux keeps ru_maxrss across
    # execve), so the child forks the render into a grandchild and reads that one's peak.
    script = textwrap.dedent(f"""
        import json, os, resource, sys, time
        from qbench.core.untrusted import template_environment
        env = template_environment()
        read, write = os.pipe()
        if os.fork() == 0:
            started = time.perf_counter()
            try:
                env.from_string({BOMBS[name]!r}).render(country="France")
                outcome = "rendered"
            except Exception as exc:
                outcome = f"{{type(exc).__name__}}: {{exc}}"
            os.write(write, json.dumps({{"outcome": outcome, "seconds": time.perf_counter() - started}}).encode())
            os._exit(0)
        os.close(write)
        found = json.loads(os.read(read, 65536))
        os.wait()
        found.update(peak_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                     torch="torch" in sys.modules)
        print(json.dumps(found))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    found = json.loads(proc.stdout)
    assert found["outcome"].startswith("SecurityError") and not found["torch"], found
    assert found["seconds"] < 3 and found["peak_mb"] < 300, found


def validation_cases() -> list[tuple[str, Callable[[Ctx], list[str]]]]:
    """Every case that names a suite it built: checked by `suites validate`,
    or by `run` with no variant named (the suite is what is wrong)."""
    return [(case, build) for case, build, _, _ in CASES
            if case.startswith(("suite-", "corpus-", "task-", "lm-eval-", "validate-", "windows-", "latency-",
                                "generation-", "calibration-too-short", "stride-"))]


@pytest.mark.parametrize("build", [c[1] for c in validation_cases()], ids=[c[0] for c in validation_cases()])
def test_validate_and_run_planning_agree(build, tiny_model, tmp_path):
    """`suites validate` once said "valid" for task files and corpora that
    `run` refused. Both now make the same checks: on every bad suite they
    fail with the same line (or both accept it)."""
    from qbench.core.errors import QBenchError
    from qbench.data.suites import load_suite
    from qbench.execute.runs import check_suite, create_run

    ctx = Ctx(tmp=tmp_path, model=tiny_model, suite=tmp_path / "none.yaml", run=tmp_path / "run")
    args = build(ctx)
    suite = args[2] if args[:2] == ["suites", "validate"] else args[args.index("--suite") + 1]
    outside = "--allow-outside-data" in args

    def error_of(action) -> Optional[str]:
        try:
            action()
        except QBenchError as exc:
            return str(exc)
        return None

    validated = error_of(lambda: check_suite(load_suite(suite, allow_outside_data=outside), str(tiny_model)))
    planned = error_of(lambda: create_run(model=str(tiny_model), suite=suite, backends=["fp:bf16"], device="cpu",
                                          output_dir=str(tmp_path / "out"), allow_outside_data=outside))
    assert validated == planned


def test_published_markdown_carries_no_markup_from_suite_and_task_names(tiny_model, tmp_path):
    """report.md once carried raw <script> and <img onerror> from a suite's
    and a task's names (report.html escaped them)."""
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "t.jsonl").write_text(GOOD_ITEM + "\n")
    suite = folder / "evil.yaml"
    suite.write_text("name: '<script>alert(1)</script>'\n" + PPL
                     + "tasks:\n  - {name: '<img src=x onerror=alert(2)>', path: t.jsonl}\n")
    proc = qbench_cli(["run", "--model", str(tiny_model), "--suite", str(suite), "--device", "cpu", "-b",
                       "fake:uniform", "--plugins-dir", str(FAKE_PLUGINS), "-o", str(tmp_path / "out"), "--run-id",
                       "r"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    markdown = (tmp_path / "out" / "r" / "report.md").read_text()
    # Code spans render literally (CommonMark): outside them, nothing may start a tag.
    text = re.sub(r"`[^`]*`", "", markdown)
    assert "&lt;script>alert(1)&lt;/script>" in text and "<script" not in text and "<img" not in text
    page = (tmp_path / "out" / "r" / "report.html").read_text()
    assert "<script>alert" not in page and "onerror=alert(2)>" not in page
