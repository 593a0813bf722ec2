"""The quantized-artifact cache.

An entry is keyed by everything that changes its bytes: model fingerprint,
backend, backend version, variant settings and calibration-data hash. It is a
folder holding the backend's files and ``artifact.json``, written last, so a
killed quantization never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from pydantic import ValidationError

from qbench.backend import Artifact, Backend, VariantConfig
from qbench.errors import QBenchError
from qbench.paths import cache_dir, file_lock


def artifact_key(model_fingerprint: str, backend: Backend, config: VariantConfig,
                 calibration_hash: Optional[str]) -> str:
    payload = {
        "model": model_fingerprint,
        "backend": backend.name,
        "backend_version": backend.version(),
        "artifact_format": backend.artifact_format,
        "config": config.cache_settings(),
        "calibration": calibration_hash,
        "inputs": backend.cache_inputs(config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def obtain_artifact(
    backend: Backend,
    variant: str,
    config: VariantConfig,
    model_path: str,
    model_fingerprint: str,
    calibration: Optional[list[list[int]]],
    calibration_hash: Optional[str],
    on_build: Callable[[], None] = lambda: None,
) -> tuple[Artifact, bool, str]:
    """Return (artifact, cache_hit, key), quantizing only on a cache miss."""
    key = artifact_key(model_fingerprint, backend, config, calibration_hash)
    entry = cache_dir() / "artifacts" / backend.name / key
    record = entry / "artifact.json"
    with file_lock(entry.parent / f"{key}.lock"):
        if record.exists():
            try:
                artifact = Artifact.model_validate_json(record.read_text())
            except (ValidationError, ValueError, OSError):
                raise QBenchError(
                    f"corrupt artifact cache entry {entry} (unreadable artifact.json): delete that folder "
                    f"(rm -r '{entry}') and run again to re-quantize"
                ) from None
            missing = [p for p in artifact.meta.get("files", []) if not (entry / "files" / p).exists()]
            if missing:
                raise QBenchError(
                    f"corrupt artifact cache entry {entry} (missing {missing[0]}): delete that folder "
                    f"(rm -r '{entry}') and run again to re-quantize"
                )
            # Same content, maybe elsewhere now: the key is the model's
            # fingerprint, not its path, and the cache folder may have moved.
            # Load-only settings may differ from the build's: take the current ones.
            return artifact.model_copy(update={"model_path": model_path, "path": str(entry / "files"),
                                               "config": config.settings()}), True, key
        if entry.exists():  # leftovers of a killed quantization
            shutil.rmtree(entry)
        workdir = entry / "files"
        workdir.mkdir(parents=True)
        on_build()
        started = time.perf_counter()
        try:
            meta = backend.quantize(Path(model_path), config, calibration, workdir)
        except BaseException:
            shutil.rmtree(entry, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        meta = dict(meta or {})
        meta["files"] = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file())
        artifact = Artifact(backend=backend.name, variant=variant, config=config.settings(), path=str(workdir),
                            model_path=model_path, meta=meta, quantize_seconds=seconds)
        tmp = entry / "artifact.json.tmp"
        tmp.write_text(artifact.model_dump_json(indent=1))
        tmp.replace(record)
        return artifact, False, key


def artifact_weight_bytes(artifact: Artifact) -> Optional[int]:
    """Bytes of the tensor files the backend wrote (None when it wrote none,
    e.g. a dtype cast done at load time)."""
    files = [f for f in Path(artifact.path).rglob("*") if f.suffix in (".safetensors", ".onnx", ".data", ".bin")]
    return sum(f.stat().st_size for f in files) or None
