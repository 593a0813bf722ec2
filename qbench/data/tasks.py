"""Multiple-choice tasks: their items (qbench's JSONL or an lm-eval task
YAML) and the request windows that score each choice, as lm-eval does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from qbench.core.datafiles import read_text
from qbench.core.errors import QBenchError
from qbench.data.items import validate_item
from qbench.data.lm_eval_tasks import lm_eval_encode, load_task, prefix_token_id
from qbench.data.windows import Window


def load_items(path: Path, limit: Optional[int]) -> list[dict[str, Any]]:
    """Items of a task: qbench's JSONL ({"context", "choices", "gold"} per
    line) or an lm-evaluation-harness task YAML with local data."""
    if path.suffix in (".yaml", ".yml"):
        return load_task(path, limit)
    if not path.is_file():
        raise QBenchError(f"task file {path} not found")
    items = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise QBenchError(f"{path}:{lineno}: not JSON ({exc}); each line holds one item") from None
        items.append(validate_item(raw, f"{path}:{lineno}"))
        if limit and len(items) == limit:
            break
    if not items:
        raise QBenchError(f"task file {path} holds no items")
    return items


def request_windows(
    tokenizer, items: list[dict[str, Any]], bos_id: Optional[int], lm_eval_rule: bool = False
) -> list[Window]:
    """One window per (item, choice): the joint encoding of context + choice,
    split at the context's token count; only the choice's tokens are scored.
    Trailing spaces move from the context to the choice, as in lm-eval.

    ``lm_eval_rule``: tokenize as lm-eval's HF model does (the tokenizer's
    own special tokens, none when the context already starts with the BOS
    text; an empty context conditions on BOS, else EOS), whatever the
    suite's BOS policy. Otherwise ``bos_id`` (the suite's policy) prefixes
    every request and the tokenizer adds nothing."""
    windows = []
    prefix = [bos_id] if bos_id is not None and not lm_eval_rule else []
    for item in items:
        for choice in item["choices"]:
            context = item["context"]
            stripped = context.rstrip(" ")
            continuation = context[len(stripped) :] + choice
            if lm_eval_rule and stripped:
                ctx, whole = lm_eval_encode(tokenizer, stripped), lm_eval_encode(tokenizer, stripped + continuation)
            elif lm_eval_rule:  # an empty context conditions on the prefix token
                ctx = [prefix_token_id(tokenizer)]
                whole = ctx + tokenizer(continuation, add_special_tokens=False)["input_ids"]
            else:
                ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
                whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
            n_cont = len(whole) - len(ctx)
            if not prefix and not ctx:
                raise QBenchError("a multiple-choice item has an empty context and no BOS to condition on")
            windows.append(Window(tuple(prefix + whole), n_cont, (0, n_cont)))
    return windows
