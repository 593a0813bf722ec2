"""What a result was measured on: packages, hardware, threads, git commit."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import psutil

#: Packages whose versions change numbers; recorded with every result.
TRACKED_PACKAGES = (
    "qbench",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "tokenizers",
    "numpy",
    "bitsandbytes",
    "torchao",
    "gptqmodel",
    "optimum",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-genai",
    "gguf",
    "pluggy",
)


def package_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(requires: dict[str, str]) -> dict[str, str]:
    """``{import name: pip spec}`` for each requirement that cannot be imported."""
    return {mod: spec for mod, spec in requires.items() if importlib.util.find_spec(mod) is None}


def git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_environment(device: str) -> dict[str, Any]:
    """Everything needed to tell whether two results are comparable."""
    import torch

    env: dict[str, Any] = {
        "packages": {p: v for p in TRACKED_PACKAGES if (v := package_version(p))},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total_bytes": psutil.virtual_memory().total,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": device,
        "git_commit": git_commit(),
    }
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        # which GPU measured the record, with --gpus one per worker
        env["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    if os.environ.get("QBENCH_RAY_NODE"):
        env["ray_node_id"] = os.environ["QBENCH_RAY_NODE"]  # set by qbench.execute.ray_executor
        env["hostname"] = platform.node()
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
        }
    return env


def _nvidia_driver() -> Optional[str]:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        return None


def resolve_device(device: str) -> str:
    import torch

    from qbench.core.errors import QBenchError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QBenchError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise QBenchError(f"unknown device '{device}': use auto, cpu or cuda")
    return device
