"""How close decoding comes to the memory-bandwidth limit.

Batch-1 decoding reads every weight once per step (but an untied input
embedding table, of which it reads one row), plus the KV cache of the
positions so far: its speed limit is bytes per step over the memory
bandwidth. ``roofline_fraction`` is the bandwidth a row achieved (bytes read
per decode step / time per step) as a share of the device's measured peak.
The peak is measured once per run with a copy benchmark (bytes read plus
bytes written per second, the way STREAM's copy and device-to-device copies
are reported), by the first cell that times latency, and kept in the run
folder so every row is divided by the same number.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from qbench.core.io import write_atomic
from qbench.metrics import metric

BANDWIDTH_FILE = "bandwidth.json"
#: Copy sizes: well past the last-level cache (60 MB of L2 on an H200; tens of
#: MB of L3 on a server CPU).
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}


def copy_bandwidth(device: str, repeats: int = 10) -> float:
    """Peak copy bandwidth in bytes/s (read + write), best of ``repeats``."""
    import torch

    n = COPY_BYTES[device] // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults pages in
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    del src, dst
    return 2 * n * 4 / best


def run_bandwidth(run_dir: Path, device: str) -> dict[str, Any]:
    """The run's peak bandwidth: measured by the first cell that asks, then
    read from the run folder by the others."""
    path = Path(run_dir) / BANDWIDTH_FILE
    try:
        saved = json.loads(path.read_text())
        if saved.get("device") == device and saved.get("bytes_per_s", 0) > 0:
            return saved
    except (OSError, ValueError, AttributeError):
        pass
    import torch

    measured = {
        "device": device,
        "bytes_per_s": copy_bandwidth(device),
        "method": "copy",
        "bytes": COPY_BYTES[device],
        "torch_threads": torch.get_num_threads(),
    }
    write_atomic(path, json.dumps(measured))
    return measured


def decode_bytes_per_step(weight_bytes: int, kv_bytes_per_position: Optional[int], workload: dict[str, Any]) -> int:
    """Bytes a decode step reads: the weights once, plus each sequence's KV
    cache at the mean context length of the decode steps (step i of N-1
    attends to prompt + i positions)."""
    kv = 0
    if kv_bytes_per_position:
        context = workload["prompt_tokens"] + workload["new_tokens"] / 2
        kv = kv_bytes_per_position * context * workload["batch_size"]
    return int(weight_bytes + kv)


def refresh(metrics: dict[str, Any]) -> dict[str, Any]:
    """The roofline figures again after the decode time changed (a latency
    trial was combined in): same bytes per step, same peak."""
    decode, bandwidth = metrics.get("decode_ms_per_token"), metrics.get("decode_bandwidth_bytes_per_s")
    peak = metrics.get("peak_bandwidth_bytes_per_s")
    if not (decode and bandwidth and peak and decode.get("value")):
        return {}
    per_step = bandwidth["bytes_per_step"]
    achieved = per_step / (decode["value"] / 1e3)
    return {
        "decode_bandwidth_bytes_per_s": {**bandwidth, "value": achieved},
        "roofline_fraction": {**metrics["roofline_fraction"], "value": achieved / peak["value"]},
    }


def roofline_metrics(
    weight_bytes: int,
    kv_bytes_per_position: Optional[int],
    workload: dict[str, Any],
    decode_ms: float,
    bandwidth: dict[str, Any],
) -> dict[str, Any]:
    per_step = decode_bytes_per_step(weight_bytes, kv_bytes_per_position, workload)
    achieved = per_step / (decode_ms / 1e3)
    peak = bandwidth["bytes_per_s"]
    return {
        "peak_bandwidth_bytes_per_s": metric(
            peak,
            "bytes/s",
            None,
            None,
            method=bandwidth.get("method"),
            label="the run's peak memory bandwidth: a copy benchmark (read + write), measured once per run",
        ),
        "decode_bandwidth_bytes_per_s": metric(
            achieved,
            "bytes/s",
            None,
            None,
            bytes_per_step=per_step,
            kv_included=kv_bytes_per_position is not None,
            label="bytes a decode step reads (weights as held + KV cache at the mean context) over the time per step",
        ),
        "roofline_fraction": metric(
            achieved / peak, "fraction", None, None, label="decode bandwidth as a share of the run's peak bandwidth"
        ),
    }
