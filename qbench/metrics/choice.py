"""Multiple-choice accuracy, as lm-evaluation-harness computes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError, \
    model_validator
from typing_extensions import Annotated

from qbench.datafiles import read_text
from qbench.errors import QBenchError, describe_validation
from qbench.metrics import metric, proportion_stderr
from qbench.windows import Window


def _digits_to_int(value: Any) -> Any:
    # lm-eval templates render targets as text: "2" means index 2.
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class ChoiceItem(BaseModel):
    """One multiple-choice item. Strict on purpose: a fractional gold index
    would be truncated, an empty choice has log-likelihood 0 and always
    wins, and integer choices or contexts used to fail deep in tokenizing."""

    model_config = ConfigDict(extra="ignore")
    context: StrictStr
    choices: list[StrictStr] = Field(min_length=2)
    gold: Annotated[StrictInt, BeforeValidator(_digits_to_int)]
    #: lm-eval's acc_norm denominators (choice length without the delimiter)
    norm_lengths: Optional[list[int]] = None

    @model_validator(mode="after")
    def _check(self):
        if any(not c.strip() for c in self.choices):
            raise ValueError("a choice is empty: it would score log-likelihood 0 and always win")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} is not among the {len(self.choices)} choices")
        return self


def validate_item(raw: Any, where: str) -> dict[str, Any]:
    """A task item checked against ``ChoiceItem``, or a one-line error naming
    ``where`` (file and line) and the field."""
    if not isinstance(raw, dict):
        raise QBenchError(f"{where}: expected a JSON object {{\"context\": str, \"choices\": [str, ...], "
                          f"\"gold\": int}}, got {type(raw).__name__}")
    try:
        return ChoiceItem.model_validate(raw).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise QBenchError(f"{where}: {describe_validation(exc)} (expected {{\"context\": str, \"choices\": "
                          f"[str, ...], \"gold\": int}})") from None


def load_items(path: Path, limit: Optional[int]) -> list[dict[str, Any]]:
    """Items of a task: qbench's JSONL ({"context", "choices", "gold"} per
    line) or an lm-evaluation-harness task YAML with local data."""
    if path.suffix in (".yaml", ".yml"):
        from qbench.lm_eval_tasks import load_task

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


def request_windows(tokenizer, items: list[dict[str, Any]], bos_id: Optional[int],
                    lm_eval_rule: bool = False) -> list[Window]:
    """One window per (item, choice): the joint encoding of context + choice,
    split at the context's token count; only the choice's tokens are scored.
    Trailing spaces move from the context to the choice, as in lm-eval.

    ``lm_eval_rule``: tokenize as lm-eval's HF model does (the tokenizer's
    own special tokens, none when the context already starts with the BOS
    text; an empty context conditions on BOS, else EOS), whatever the
    suite's BOS policy. Otherwise ``bos_id`` (the suite's policy) prefixes
    every request and the tokenizer adds nothing."""
    from qbench.lm_eval_tasks import lm_eval_encode, prefix_token_id

    windows = []
    prefix = [bos_id] if bos_id is not None and not lm_eval_rule else []
    for item in items:
        for choice in item["choices"]:
            context = item["context"]
            stripped = context.rstrip(" ")
            continuation = context[len(stripped):] + choice
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
