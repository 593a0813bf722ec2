"""Every number in a qbench table is computed here, the same way for every
backend. A metric value is a dict: value, unit, n (samples) and stderr where
one exists, plus metric-specific keys (percentiles, raw samples)."""

from __future__ import annotations

import math
from typing import Any, Optional


def metric(
    value: Optional[float], unit: str, n: Optional[int] = None, stderr: Optional[float] = None, **extra: Any
) -> dict[str, Any]:
    def clean(x):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)

    out: dict[str, Any] = {"value": clean(value), "unit": unit}
    if n is not None:
        out["n"] = int(n)
    if stderr is not None:
        out["stderr"] = clean(stderr)
    out.update(extra)
    return out


def proportion_stderr(p: float, n: int) -> Optional[float]:
    """sqrt(p(1-p)/(n-1)), the standard error lm-evaluation-harness and
    llama.cpp use for accuracies and agreement rates."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
