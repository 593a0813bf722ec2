"""Text sources for perplexity and calibration; tokenization with the BOS policy."""

from __future__ import annotations

import json
from pathlib import Path

from qbench.errors import QBenchError
from qbench.suites import CorpusSpec, Suite

BUILTIN_SOURCES = ("builtin:pydoc-topics",)


def _builtin_documents(source: str) -> list[str]:
    if source == "builtin:pydoc-topics":
        # Real English reference prose that ships with CPython: needs no download.
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    raise QBenchError(f"unknown corpus source '{source}': use one of {', '.join(BUILTIN_SOURCES)} or a file path")


def load_documents(spec: CorpusSpec, suite: Suite) -> list[str]:
    if spec.source.startswith("builtin:"):
        docs = _builtin_documents(spec.source)
    else:
        path = suite.resolve(spec.source)
        if path.suffix == ".jsonl":
            docs = []
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)[spec.text_field])
                except (ValueError, KeyError, TypeError):
                    raise QBenchError(
                        f"{path}:{lineno}: expected a JSON object with a '{spec.text_field}' string"
                    ) from None
        else:
            # A plain text file: blank-line separated paragraphs are documents.
            docs = [d for d in path.read_text().split("\n\n") if d.strip()]
    lo, hi = spec.documents
    picked = docs[int(round(lo * len(docs))): int(round(hi * len(docs)))]
    if not picked:
        raise QBenchError(f"corpus '{spec.source}' with documents {spec.documents} selects no document")
    return picked


def corpus_stream(tokenizer, docs: list[str], max_tokens: int) -> list[int]:
    """The documents joined by blank lines, tokenized, cut at ``max_tokens``."""
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    return ids[:max_tokens]
