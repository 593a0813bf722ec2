"""Cost: latency of a fixed greedy workload, and memory, labelled for what
each figure is."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from qbench.metrics import metric
from qbench.sdk.backend import Session


def quantile(samples: list[float], q: float) -> float:
    """Linearly interpolated quantile (numpy's default method)."""
    return float(np.quantile(np.asarray(samples, dtype=np.float64), q))


#: How the steps of a latency workload were timed (recorded with it).
HOST_CLOCK = "host clock; the host waits for each step"
DEVICE_CLOCK = "device events; steps queued ahead of the device"


def time_generate(session: Session, prompt: torch.Tensor, new_tokens: int) -> tuple[list[float], str]:
    """Seconds from the call to each generated step (cumulative), and which
    clock timed them (``HOST_CLOCK`` or ``DEVICE_CLOCK``)."""
    marks: list[float] = []
    clocks: set[str] = set()
    start = time.perf_counter()

    def on_token(finished_at: float | None = None) -> None:
        clocks.add(HOST_CLOCK if finished_at is None else DEVICE_CLOCK)
        marks.append((time.perf_counter() if finished_at is None else finished_at) - start)

    session.generate(prompt, new_tokens, on_token)
    if len(marks) != new_tokens:
        raise RuntimeError(f"backend generated {len(marks)} steps, {new_tokens} were asked (EOS must not stop it)")
    if len(clocks) != 1:
        raise RuntimeError("backend timed some steps on the host and others on the device")
    return marks, clocks.pop()


def latency_metrics(
    session: Session,
    prompt: torch.Tensor,
    new_tokens: int,
    warmup: int,
    min_reps: int,
    min_seconds: float,
    max_reps: int,
) -> dict[str, Any]:
    """Warm-ups, then repetitions until both ``min_reps`` and ``min_seconds``
    are met (or ``max_reps``). Prefill is the time to the first token; decode
    samples are the gaps between later tokens."""
    for _ in range(warmup):
        time_generate(session, prompt, new_tokens)
    prefill: list[float] = []
    decode: list[float] = []
    total: list[float] = []
    clock = HOST_CLOCK
    began = time.perf_counter()
    while len(total) < max_reps and (len(total) < min_reps or time.perf_counter() - began < min_seconds):
        marks, clock = time_generate(session, prompt, new_tokens)
        prefill.append(marks[0] * 1e3)
        decode.extend((b - a) * 1e3 for a, b in zip(marks, marks[1:]))
        total.append(marks[-1] * 1e3)
    batch, prompt_len = prompt.shape
    med_decode = statistics.median(decode)

    def dist(samples: list[float], unit: str) -> dict[str, Any]:
        return metric(
            statistics.median(samples),
            unit,
            len(samples),
            None,
            p90=quantile(samples, 0.9),
            p99=quantile(samples, 0.99),
            mean=statistics.fmean(samples),
            samples=[round(s, 4) for s in samples],
        )

    return {
        "prefill_ms": dist(prefill, "ms"),
        "decode_ms_per_token": dist(decode, "ms/token"),
        "decode_tokens_per_s": metric(batch * 1e3 / med_decode, "tokens/s", len(decode)),
        "generate_ms": dist(total, "ms"),
        "latency_workload": {
            "batch_size": batch,
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "warmup": warmup,
            "repetitions": len(total),
            "greedy": True,
            "eos": "ignored",
            "step_clock": clock,
        },
    }


class BackendClock(Session):
    """Wraps a session and adds up the seconds spent inside its calls, so the
    harness's own share of a cell's time can be reported. CUDA work belongs
    to the backend: on one GPU it is timed with CUDA events around the call,
    so the clock never makes the harness wait for the device (a wait after
    every forward pass leaves the GPU idle while Python prepares the next
    one); a model spread over several GPUs is synchronised instead."""

    def __init__(self, inner: Session):
        self.inner = inner
        self._host_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # not yet added up
        gpus = list(getattr(inner, "gpus", ()))
        self._gpu: int | None = gpus[0] if len(gpus) == 1 and torch.cuda.is_available() else None

    @property
    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._host_seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1e3
            self._events.clear()
        return self._host_seconds

    @seconds.setter
    def seconds(self, value: float) -> None:
        self._events.clear()
        self._host_seconds = value

    def _timed(self, call, *args):
        if self._gpu is not None:
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self._gpu))
        began = time.perf_counter()
        out = call(*args)
        if isinstance(out, torch.Tensor) and out.is_cuda:
            if self._gpu is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record(torch.cuda.current_stream(self._gpu))
                self._events.append((start, end))
                return out
            torch.cuda.synchronize(out.device)  # the output is ready only once every GPU of a spread model is done
        self._host_seconds += time.perf_counter() - began
        return out

    def logits(self, input_ids, attention_mask):
        return self._timed(self.inner.logits, input_ids, attention_mask)

    def generate(self, input_ids, max_new_tokens, on_token):
        return self._timed(self.inner.generate, input_ids, max_new_tokens, on_token)

    def weight_bytes(self) -> int:
        return self.inner.weight_bytes()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def use_runtime(self, runtime: str, compile_mode: str = "max-autotune"):
        # The backend's time: switching may reload a model (ONNX Runtime opens
        # a second session for its CUDA graphs), which is no harness overhead.
        return self._timed(self.inner.use_runtime, runtime, compile_mode)

    def kv_bytes_per_position(self):
        return self.inner.kv_bytes_per_position()

    def kv_measured_bytes_per_position(self):
        return self.inner.kv_measured_bytes_per_position()

    def use_kv_cache(self, kind: str):
        return self.inner.use_kv_cache(kind)

    def unread_weight_bytes(self) -> int:
        return self.inner.unread_weight_bytes()

    def close(self) -> None:
        self.inner.close()


def peak_rss_bytes() -> int:
    """Peak resident set of this (worker) process since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_metrics(session: Session, device: str) -> dict[str, Any]:
    out = {
        "weight_bytes": metric(
            session.weight_bytes(),
            "bytes",
            None,
            None,
            label="bytes of weights held by the loaded model (packed storage, scales included)",
        ),
        "peak_rss_bytes": metric(
            peak_rss_bytes(),
            "bytes",
            None,
            None,
            label="peak resident memory of the cell's worker process; forked from a server that "
            "preloaded torch and transformers, it does not count their pages it never "
            "touches (a freshly started process would: 200-300 MB more here)",
        ),
    }
    if device == "cuda" and torch.cuda.is_available():
        # summed over the worker's GPUs (several with --gpus-per-cell), each GPU's figure beside
        gpus = range(torch.cuda.device_count())
        allocated = [torch.cuda.max_memory_allocated(i) for i in gpus]
        reserved = [torch.cuda.max_memory_reserved(i) for i in gpus]
        out["cuda_peak_allocated_bytes"] = metric(
            sum(allocated),
            "bytes",
            None,
            None,
            per_gpu=allocated,
            label="PyTorch allocator peak allocated, over the cell's GPUs",
        )
        out["cuda_peak_reserved_bytes"] = metric(
            sum(reserved),
            "bytes",
            None,
            None,
            per_gpu=reserved,
            label="PyTorch allocator peak reserved, over the cell's GPUs",
        )
        nvml = _nvml_process_bytes()
        if nvml is not None:
            out["nvml_process_bytes"] = metric(
                nvml, "bytes", None, None, label="GPU memory NVML attributes to this process (at the end)"
            )
    return out


def _nvml_process_bytes():
    try:
        import os

        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return proc.usedGpuMemory
    except Exception:
        return None
    return None
