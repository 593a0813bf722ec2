"""Multiple-choice accuracy, as lm-evaluation-harness computes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from qbench.errors import QBenchError
from qbench.metrics import metric, proportion_stderr
from qbench.windows import Window


def load_items(path: Path, limit: Optional[int]) -> list[dict[str, Any]]:
    """Items of a task: qbench's JSONL ({"context", "choices", "gold"} per
    line) or an lm-evaluation-harness task YAML with local data."""
    if path.suffix in (".yaml", ".yml"):
        from qbench.lm_eval_tasks import load_task

        return load_task(path, limit)
    if not path.is_file():
        raise QBenchError(f"task file {path} not found")
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ok = (isinstance(item["context"], str) and isinstance(item["choices"], list)
                  and len(item["choices"]) > 1 and 0 <= int(item["gold"]) < len(item["choices"]))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise QBenchError(f"{path}:{lineno}: expected {{\"context\": str, \"choices\": [str, ...], \"gold\": int}}")
        items.append(item)
    return items[:limit] if limit else items


def request_windows(tokenizer, items: list[dict[str, Any]], bos_id: Optional[int]) -> list[Window]:
    """One window per (item, choice): the joint encoding of context + choice,
    split at the context's token count; only the choice's tokens are scored.
    Trailing spaces move from the context to the choice, as in lm-eval."""
    windows = []
    prefix = [bos_id] if bos_id is not None else []
    for item in items:
        for choice in item["choices"]:
            context = item["context"]
            stripped = context.rstrip(" ")
            continuation = context[len(stripped):] + choice
            ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
            whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
            n_cont = len(whole) - len(ctx)
            if not prefix and not ctx:
                raise QBenchError("a multiple-choice item has an empty context and no BOS to condition on")
            windows.append(Window(tuple(prefix + whole), n_cont, (0, n_cont)))
    return windows


def accuracy_metrics(items: list[dict[str, Any]], token_logprobs: torch.Tensor,
                     windows: list[Window]) -> dict[str, Any]:
    """acc: argmax of summed log-likelihood; acc_norm: of log-likelihood per
    character of the choice. Both with sqrt(p(1-p)/(n-1))."""
    sums = torch.split(token_logprobs.double(), [w.n_scored for w in windows])
    lls = [s.sum().item() for s in sums]
    correct = correct_norm = 0
    cursor = 0
    for item in items:
        k = len(item["choices"])
        ll = lls[cursor: cursor + k]
        # lm-eval normalises by the choice's length without the delimiter
        # (``norm_lengths``, from lm-eval task files); ours bake the space in.
        lengths = item.get("norm_lengths") or [len(c) for c in item["choices"]]
        norm = [v / max(n, 1) for v, n in zip(ll, lengths)]
        gold = int(item["gold"])
        correct += int(max(range(k), key=ll.__getitem__) == gold)
        correct_norm += int(max(range(k), key=norm.__getitem__) == gold)
        cursor += k
    n = len(items)
    acc, acc_norm = correct / n, correct_norm / n
    return {
        "acc": metric(acc, "fraction", n, proportion_stderr(acc, n)),
        "acc_norm": metric(acc_norm, "fraction", n, proportion_stderr(acc_norm, n)),
    }
