"""The one map from the dtype names users write in variant settings to
torch's: every backend reads it, so ``compute_dtype=bf16`` means the same
everywhere."""

from __future__ import annotations

from typing import Literal

import torch

#: Setting value -> torch dtype attribute name.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

#: The type of a ``dtype`` / ``compute_dtype`` setting.
DtypeName = Literal["fp32", "bf16", "fp16"]
#: A ``compute_dtype`` setting that may follow the device (``auto``).
ComputeDtype = Literal["auto", "fp32", "bf16", "fp16"]


def device_dtype(name: str, device: str) -> str:
    """``auto`` as the device computes: float32 on the CPU, bfloat16 on CUDA
    (what a GPU user computes in); any other name as given. Backends resolve
    it in ``for_device``, so records and cache keys hold the dtype used."""
    if name != "auto":
        return name
    return "bf16" if device == "cuda" else "fp32"


def torch_dtype(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``."""
    return getattr(torch, DTYPES[name])


def short_name(dtype: str) -> str:
    """``"torch.bfloat16"``, ``"bfloat16"`` or ``"bf16"`` -> ``"bf16"``; an
    unknown name as given."""
    name = dtype.removeprefix("torch.")
    return next((short for short, long in DTYPES.items() if name in (short, long)), name)


def cast_note(row: str | None, baseline: str | None, baseline_cell: str, row_cell: str = "") -> str | None:
    """The note for a row that computes in another float dtype than the
    baseline, or None (same dtype; either unknown, or not a float dtype, such
    as llama.cpp's 8-bit activations, which the row's quantization includes;
    or the row is that cast, ``fp:bf16``). Used when a run is planned and
    again on its records."""
    if not row or not baseline or short_name(row) == short_name(baseline):
        return None
    if short_name(row) not in DTYPES or short_name(baseline) not in DTYPES:
        return None
    mine, theirs = short_name(row), short_name(baseline)
    if row_cell == f"fp:{mine}":
        return None
    return (
        f"computes in {mine}, the baseline `{baseline_cell}` in {theirs}: its KLD includes that cast and its "
        f"speed is not the quantization's alone (compare with fp:{mine})"
    )
