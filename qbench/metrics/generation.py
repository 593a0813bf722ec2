"""Greedy generations compared with the baseline's on the same prompts."""

from __future__ import annotations

from typing import Any

from qbench.metrics import metric, proportion_stderr


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generation_metrics(outputs: list[list[int]], baseline: list[list[int]]) -> dict[str, Any]:
    n = len(outputs)
    exact = sum(o == b for o, b in zip(outputs, baseline)) / n
    prefixes = [common_prefix(o, b) for o, b in zip(outputs, baseline)]
    return {
        "gen_exact_match": metric(exact, "fraction", n, proportion_stderr(exact, n)),
        "gen_common_prefix": metric(
            sum(prefixes) / n, "tokens", n, None, samples=prefixes, max_tokens=len(baseline[0]) if baseline else 0
        ),
    }
