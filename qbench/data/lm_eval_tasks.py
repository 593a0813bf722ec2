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

from qbench.core.datafiles import read_text
from qbench.core.errors import QBenchError
from qbench.core.untrusted import BoundedLoader, load_yaml, template_environment
from qbench.data.items import validate_item

UNSUPPORTED = ("process_docs", "include", "doc_to_decontamination_query", "fewshot_config")


class FunctionTag(str):
    pass


class TaskFileLoader(BoundedLoader):
    """The bounded loader, turning lm-eval's ``!function`` tag into a marker,
    so it is refused with a clear message instead of a YAML error."""


TaskFileLoader.add_constructor("!function", lambda loader, node: FunctionTag(loader.construct_scalar(node)))


def prefix_token_id(tokenizer) -> Optional[int]:
    """lm-eval's prefix token (an empty context, a rolling window's start):
    BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def lm_eval_encode(tokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's Hugging Face model encodes a text: with the
    tokenizer's own special tokens, unless the text already starts with the
    prefix token's text."""
    prefix = prefix_token_id(tokenizer)
    starts = prefix is not None and text.startswith(tokenizer.decode([prefix]))
    return tokenizer.encode(text, add_special_tokens=not starts)


def load_task_yaml(path: Path) -> dict[str, Any]:
    """A task file as a mapping, read without running anything."""
    config = load_yaml(read_text(path), path, TaskFileLoader)
    if not isinstance(config, dict):
        raise QBenchError(f"{path}: an lm-eval task file must be a mapping")
    return config


def read_config(path: Path) -> dict[str, Any]:
    config = load_task_yaml(path)
    for key, value in config.items():
        if isinstance(value, FunctionTag):
            raise QBenchError(
                f"{path}: '{key}: !function {value}' runs Python from the task; qbench supports "
                "field names and Jinja templates only"
            )
    for key in UNSUPPORTED:
        if key in config:
            raise QBenchError(
                f"{path}: '{key}' is not supported by qbench's native task reader: list the file "
                "under the suite's lm_eval: tasks to run it through lm-evaluation-harness"
            )
    if config.get("output_type", "multiple_choice") != "multiple_choice":
        raise QBenchError(f"{path}: output_type '{config['output_type']}' is not supported (multiple_choice only)")
    if int(config.get("num_fewshot", 0) or 0):
        raise QBenchError(f"{path}: num_fewshot must be 0: qbench evaluates zero-shot")
    return config


def data_file(path: Path, config: dict[str, Any]) -> Path:
    """The local file of the split lm-eval would evaluate (test, else validation)."""
    if config.get("dataset_path") not in ("json", "csv"):
        raise QBenchError(
            f"{path}: dataset_path '{config.get('dataset_path')}' is not local data: use "
            "'dataset_path: json' (or csv) with data_files"
        )
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
    text = read_text(path)
    if kind == "csv":
        return list(csv.DictReader(text.splitlines()))
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
        return env.from_string(spec).render(**doc)  # bounded: qbench.core.untrusted
    return spec


def load_task(path: Path, limit: Optional[int]) -> list[dict[str, Any]]:
    """Items in qbench's form: context, choices (with the target delimiter in
    front, as lm-eval joins them) and the gold index. ``norm_lengths`` keeps
    lm-eval's acc_norm denominator: the choice's length without delimiter."""
    import jinja2
    from jinja2.sandbox import SecurityError

    config = read_config(path)
    env = template_environment()
    delimiter = config.get("target_delimiter", " ")
    source = data_file(path, config)
    items = []
    for number, doc in enumerate(_docs(source, config["dataset_path"]), 1):
        if not isinstance(doc, dict):
            raise QBenchError(f"{path}: document {number} of {source.name} is not a JSON object")
        field = "doc_to_text"
        try:
            context = _render(config.get("doc_to_text", ""), doc, env)
            field = "doc_to_choice"
            choices = _render(config.get("doc_to_choice"), doc, env)
            if isinstance(choices, str):
                choices = ast.literal_eval(choices)
            if not isinstance(choices, list):
                raise ValueError(f"expected a list of choices, got {type(choices).__name__}")
            field = "doc_to_target"
            target = _render(config.get("doc_to_target"), doc, env)
            if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
                target = [str(c) for c in choices].index(target)
        except SecurityError as exc:
            raise QBenchError(
                f"{path}: field '{field}': template refused by the sandbox ({exc}); task templates "
                "may only read the document's fields"
            ) from None
        except (jinja2.TemplateError, ValueError, SyntaxError, TypeError, KeyError, MemoryError) as exc:
            raise QBenchError(
                f"{path}: field '{field}', document {number} of {source.name}: {type(exc).__name__}: {exc}"
            ) from None
        where = f"{path}: document {number} of {source.name}"
        items.append(
            validate_item(
                {
                    "context": str(context),
                    "choices": [delimiter + str(c) for c in choices],
                    "gold": target,
                    "norm_lengths": [len(str(c)) for c in choices],
                },
                where,
            )
        )
        if limit and len(items) == limit:
            break
    if not items:
        raise QBenchError(f"{path}: {source} holds no documents")
    return items
