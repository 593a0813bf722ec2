"""Text sources for perplexity and calibration; tokenization with the BOS policy."""

from __future__ import annotations

import json
from pathlib import Path

from qbench.core.datafiles import read_text
from qbench.core.errors import QBenchError
from qbench.data.suites import CorpusSpec, Suite

BUILTIN_SOURCES = ("builtin:pydoc-topics", "builtin:stdlib-sources")

#: Long modules of CPython's standard library, pure Python in 3.10-3.13, in a
#: fixed order: long documents (25k-40k tokens each) that need no download,
#: for long-context windows that one document fills.
STDLIB_MODULES = (
    "argparse", "inspect", "typing", "subprocess", "dataclasses", "tarfile", "difflib", "threading",
    "shutil", "enum", "functools", "tempfile",
)  # fmt: skip


def _stdlib_sources() -> list[str]:
    import importlib.util

    docs = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise QBenchError(
                f"builtin:stdlib-sources needs the source of the standard library's '{name}' module, which this "
                "Python does not ship: use builtin:pydoc-topics or a corpus file"
            )
        docs.append(read_text(Path(spec.origin)))
    return docs


def _builtin_documents(source: str) -> list[str]:
    if source == "builtin:pydoc-topics":
        # Real English reference prose that ships with CPython: needs no download.
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    if source == "builtin:stdlib-sources":
        return _stdlib_sources()
    raise QBenchError(f"unknown corpus source '{source}': use one of {', '.join(BUILTIN_SOURCES)} or a file path")


def _hub_documents(source: str, text_field: str) -> list[str]:
    """``hf:DATASET[:CONFIG]:SPLIT`` through the `datasets` library, for users
    with a hub: never needed by the default suites or the tests."""
    parts = source[len("hf:") :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise QBenchError(
            f"corpus source '{source}': expected hf:DATASET:SPLIT or hf:DATASET:CONFIG:SPLIT, "
            "e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1:test"
        )
    try:
        import datasets
    except ImportError:
        raise QBenchError(f"corpus source '{source}' needs the `datasets` package: pip install datasets") from None
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown dataset, bad split: say which, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise QBenchError(
            f"cannot load corpus '{source}' from the Hugging Face hub ({first}); offline, use a "
            "local .txt/.jsonl file or builtin:pydoc-topics"
        ) from None
    if text_field not in rows.column_names:
        raise QBenchError(
            f"corpus '{source}' has no column '{text_field}' (columns: {', '.join(rows.column_names)}): set text_field"
        )
    return [t for t in rows[text_field] if isinstance(t, str) and t.strip()]


def load_documents(spec: CorpusSpec, suite: Suite) -> list[str]:
    if spec.source.startswith("builtin:"):
        docs = _builtin_documents(spec.source)
    elif spec.source.startswith("hf:"):
        docs = _hub_documents(spec.source, spec.text_field)
    else:
        path = suite.resolve(spec.source)
        text = read_text(path)
        if path.suffix == ".jsonl":
            docs = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[spec.text_field]
                except (ValueError, KeyError, TypeError):
                    doc = None
                if not isinstance(doc, str):
                    raise QBenchError(
                        f"{path}:{lineno}: expected a JSON object with a '{spec.text_field}' string"
                    ) from None
                if doc.strip():
                    docs.append(doc)
        else:
            # A plain text file: blank-line separated paragraphs are documents.
            docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise QBenchError(f"corpus file {path} holds no text")
    lo, hi = spec.documents
    picked = docs[int(round(lo * len(docs))) : int(round(hi * len(docs)))]
    if not picked:
        raise QBenchError(f"corpus '{spec.source}' with documents {spec.documents} selects no document")
    return picked


def corpus_stream(tokenizer, docs: list[str], max_tokens: int) -> list[int]:
    """The documents joined by blank lines, tokenized, cut at ``max_tokens``."""
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    return ids[:max_tokens]
