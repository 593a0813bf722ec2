"""Multiple-choice accuracy, as lm-evaluation-harness computes it."""

from __future__ import annotations

from typing import Any

import torch

from qbench.data.windows import Window
from qbench.metrics import metric, proportion_stderr


def accuracy_metrics(
    items: list[dict[str, Any]], token_logprobs: torch.Tensor, windows: list[Window]
) -> dict[str, Any]:
    """acc: argmax of summed log-likelihood; acc_norm: of log-likelihood per
    character of the choice. Both with sqrt(p(1-p)/(n-1))."""
    sums = torch.split(token_logprobs.double(), [w.n_scored for w in windows])
    lls = [s.sum().item() for s in sums]
    correct = correct_norm = 0
    cursor = 0
    for item in items:
        k = len(item["choices"])
        ll = lls[cursor : cursor + k]
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
