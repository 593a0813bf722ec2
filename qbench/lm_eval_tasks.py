"""Multiple-choice tasks written in lm-evaluation-harness's task format, with
local data, so users bring the standard tasks (HellaSwag, ARC, PIQA...) they
have on disk and get numbers comparable with that harness.

Supported: ``dataset_path: json`` (or ``csv``) with ``dataset_kwargs.data_files``
or ``data_files``; ``test_split`` / ``validation_split``; ``doc_to_text``,
``doc_to_choice`` and ``doc_to_target`` as field names or Jinja templates (as
lm-eval reads them); ``target_delimiter``; ``output_type: multiple_choice``.
Not supported, with an error saying so: ``!function`` hooks, ``process_docs``,
``include``, few-shot prompts, and hub datasets.
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from qbench.errors import QBenchError

UNSUPPORTED = ("process_docs", "include", "doc_to_decontamination_query", "fewshot_config")


class _FunctionTag(str):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that turns lm-eval's ``!function`` tag into a marker, so we
    can refuse it with a clear message instead of a YAML error."""


_Loader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise QBenchError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise QBenchError(f"{path}: an lm-eval task file must be a mapping")
    for key, value in config.items():
        if isinstance(value, _FunctionTag):
            raise QBenchError(f"{path}: '{key}: !function {value}' runs Python from the task; qbench supports "
                              "field names and Jinja templates only")
    for key in UNSUPPORTED:
        if key in config:
            raise QBenchError(f"{path}: '{key}' is not supported by qbench's lm-eval task reader")
    if config.get("output_type", "multiple_choice") != "multiple_choice":
        raise QBenchError(f"{path}: output_type '{config['output_type']}' is not supported (multiple_choice only)")
    if int(config.get("num_fewshot", 0) or 0):
        raise QBenchError(f"{path}: num_fewshot must be 0: qbench evaluates zero-shot")
    return config


def data_file(path: Path, config: dict[str, Any]) -> Path:
    """The local file of the split lm-eval would evaluate (test, else validation)."""
    if config.get("dataset_path") not in ("json", "csv"):
        raise QBenchError(f"{path}: dataset_path '{config.get('dataset_path')}' is not local data: use "
                          "'dataset_path: json' (or csv) with data_files")
    files = (config.get("dataset_kwargs") or {}).get("data_files") or config.get("data_files")
    split = config.get("test_split") or config.get("validation_split") or "test"
    if isinstance(files, dict):
        files = files.get(split)
    if isinstance(files, list):
        files = files[0] if len(files) == 1 else None
    if not isinstance(files, str):
        raise QBenchError(f"{path}: give one data file for split '{split}' in dataset_kwargs.data_files")
    resolved = (path.parent / files).resolve()
    if not resolved.is_file():
        raise QBenchError(f"{path}: data file {resolved} not found")
    return resolved


def _docs(path: Path, kind: str) -> list[dict[str, Any]]:
    if kind == "csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise QBenchError(f"{path}: not JSON lines ({exc.msg} at line {exc.lineno})") from None


def _render(spec: Any, doc: dict[str, Any], env) -> Any:
    """lm-eval's rule: a string naming a field of the doc reads that field;
    any other string is a Jinja template; lists and ints are literal."""
    if isinstance(spec, str):
        if spec in doc:
            return doc[spec]
        return env.from_string(spec).render(**doc)
    return spec


def load_task(path: Path, limit: Optional[int]) -> list[dict[str, Any]]:
    """Items in qbench's form: context, choices (with the target delimiter in
    front, as lm-eval joins them) and the gold index. ``norm_lengths`` keeps
    lm-eval's acc_norm denominator: the choice's length without delimiter."""
    import jinja2

    config = read_config(path)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    delimiter = config.get("target_delimiter", " ")
    source = data_file(path, config)
    items = []
    for number, doc in enumerate(_docs(source, config["dataset_path"]), 1):
        try:
            context = str(_render(config.get("doc_to_text", ""), doc, env))
            choices = _render(config.get("doc_to_choice"), doc, env)
            if isinstance(choices, str):
                choices = ast.literal_eval(choices)
            choices = [str(c) for c in choices]
            target = _render(config.get("doc_to_target"), doc, env)
            if isinstance(target, str):
                target = int(target) if target.strip().lstrip("-").isdigit() else choices.index(target)
            gold = int(target)
        except (jinja2.TemplateError, ValueError, SyntaxError, TypeError, KeyError) as exc:
            raise QBenchError(f"{path}: document {number} of {source.name}: {type(exc).__name__}: {exc}") from None
        if len(choices) < 2 or not 0 <= gold < len(choices):
            raise QBenchError(f"{path}: document {number}: needs 2+ choices and a target index among them")
        items.append({"context": context, "choices": [delimiter + c for c in choices], "gold": gold,
                      "norm_lengths": [len(c) for c in choices]})
        if limit and len(items) == limit:
            break
    if not items:
        raise QBenchError(f"{path}: {source} holds no documents")
    return items
