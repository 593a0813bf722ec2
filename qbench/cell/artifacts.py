"""The quantized-artifact cache.

An entry is keyed by everything that changes its bytes: model fingerprint,
backend, backend version, variant settings and calibration-data hash. It is a
folder holding the backend's files and ``artifact.json``, written last, so a
killed quantization never leaves an entry that looks complete.

``artifact.json`` is the entry's manifest. It names what the entry holds
(the key it was written under, and everything that key was computed from:
model fingerprint, backend and its version, artifact format, the variant's
cache settings, calibration hash, cache layout version) and lists every file
with its size and sha256. A cache hit checks all of it before the entry is
used: an entry copied whole from another variant (manifest included), a
file copied in, truncated or added by hand makes the cell fail with the
``rm -r`` that fixes it, instead of producing a row for the wrong variant.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from qbench.core.errors import QBenchError
from qbench.core.io import file_digest, write_atomic
from qbench.core.paths import cache_dir, file_lock
from qbench.sdk.backend import Artifact, Backend, VariantConfig

#: Version of the entry layout: 2 added per-file checksums, 3 the manifest's
#: identity (entries of older layouts are not found under the new keys and
#: get rebuilt, never used unchecked).
CACHE_FORMAT = 3


def digest_files(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder``: relative path -> (size, sha256)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, file_digest(p)) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def verify_entry(entry: Path, artifact: Artifact) -> None:
    """Check the entry's files against the sizes and sha256 recorded when it
    was built; a one-line error with the fix when anything differs."""
    fix = f"delete it (rm -r '{entry}') and run again to re-quantize"
    folder = entry / "files"
    paths = list(folder.rglob("*")) if folder.is_dir() else []
    # backends write plain files; a link could point anywhere (a device, another entry)
    links = sorted(str(p.relative_to(folder)) for p in paths if p.is_symlink())
    found = {str(p.relative_to(folder)) for p in paths if p.is_file()}
    missing = sorted(set(artifact.files) - found)
    extra = sorted(found - set(artifact.files))
    problem = None
    if links:
        problem = f"{links[0]} is a link, not a file the backend wrote"
    elif missing:
        problem = f"{missing[0]} is missing"
    elif extra:
        problem = f"{extra[0]} was not part of the entry when it was built"
    else:
        for name, (size, sha) in artifact.files.items():
            path = folder / name
            if path.stat().st_size != size:
                problem = f"{name} has {path.stat().st_size} bytes, {size} were written"
            elif file_digest(path) != sha:
                problem = f"{name} differs from what was written (sha256)"
            if problem:
                break
    if problem:
        raise QBenchError(f"artifact cache entry {entry} does not match its checksums ({problem}): {fix}")


def artifact_identity(
    model_fingerprint: str, backend: Backend, config: VariantConfig, calibration_hash: Optional[str]
) -> dict[str, Any]:
    """Everything that decides an entry's bytes; its hash is the key, and the
    manifest keeps it whole so that a hit can say what differs."""
    return {
        "model": model_fingerprint,
        "backend": backend.name,
        "backend_version": backend.version(),
        "artifact_format": backend.artifact_format,
        "config": config.cache_settings(),
        "calibration": calibration_hash,
        "inputs": backend.cache_inputs(config),
        "cache_format": CACHE_FORMAT,
    }


def key_of(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def artifact_key(
    model_fingerprint: str, backend: Backend, config: VariantConfig, calibration_hash: Optional[str]
) -> str:
    return key_of(artifact_identity(model_fingerprint, backend, config, calibration_hash))


def is_cached(backend_name: str, key: str) -> bool:
    """Whether the cache holds a (not yet verified) entry under ``key``."""
    return (cache_dir() / "artifacts" / backend_name / key / "artifact.json").is_file()


def verify_identity(entry: Path, artifact: Artifact, key: str, identity: dict[str, Any]) -> None:
    """The manifest must name the entry it sits in and what was asked for:
    the key (the folder's name too) and each field the key was computed from."""
    fix = f"delete it (rm -r '{entry}') and run again to re-quantize"
    problem = None
    if entry.name != key:
        problem = f"it lies in folder {entry.name}, not under its key {key}"
    elif artifact.key != key:
        problem = (
            f"its manifest was written under key {artifact.key or '(none)'} for "
            f"{artifact.backend}:{artifact.variant}, not under {key}: it was copied from another entry"
        )
    else:
        stored = json.loads(json.dumps(artifact.identity, sort_keys=True))
        wanted = json.loads(json.dumps(identity, sort_keys=True))
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if differ:
            problem = (
                f"its manifest holds {differ[0]}={stored.get(differ[0])!r}, this cell asks for "
                f"{wanted.get(differ[0])!r}"
            )
    if problem:
        raise QBenchError(f"artifact cache entry {entry} is not the entry asked for ({problem}): {fix}")


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
    identity = artifact_identity(model_fingerprint, backend, config, calibration_hash)
    key = key_of(identity)
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
            started = time.perf_counter()
            verify_identity(entry, artifact, key, identity)
            verify_entry(entry, artifact)
            verified = time.perf_counter() - started
            # Same content, maybe elsewhere now: the key is the model's
            # fingerprint, not its path, and the cache folder may have moved.
            # Load-only settings may differ from the build's: take the current ones.
            return (
                artifact.model_copy(
                    update={
                        "model_path": model_path,
                        "path": str(entry / "files"),
                        "config": config.settings(),
                        "verify_seconds": verified,
                    }
                ),
                True,
                key,
            )
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
        artifact = Artifact(
            backend=backend.name,
            variant=variant,
            config=config.settings(),
            path=str(workdir),
            model_path=model_path,
            meta=dict(meta or {}),
            quantize_seconds=seconds,
            files=digest_files(workdir),
            key=key,
            identity=identity,
        )
        write_atomic(record, artifact.model_dump_json(indent=1))
        return artifact, False, key


def artifact_weight_bytes(artifact: Artifact) -> Optional[int]:
    """Bytes of the tensor files the backend wrote (None when it wrote none,
    e.g. a dtype cast done at load time)."""
    files = [f for f in Path(artifact.path).rglob("*") if f.suffix in (".safetensors", ".onnx", ".data", ".bin")]
    return sum(f.stat().st_size for f in files) or None


def _build_in_child(
    conn,
    plugins,
    backend_name: str,
    variant: str,
    settings: dict[str, Any],
    model_path: str,
    model_fingerprint: str,
    calibration,
    calibration_hash,
    threads: Optional[int],
) -> None:
    """The child of ``build_apart``: builds the artifact into the cache and
    says how it went over ``conn``: ("progress", text), then ("done",) or
    ("error", kind, message)."""
    from qbench.core import progress
    from qbench.core.processes import die_with_parent

    die_with_parent()
    try:
        import torch

        from qbench.sdk.registry import get_backend, load_plugins

        if threads:
            torch.set_num_threads(threads)
        backend = get_backend(load_plugins(plugins), backend_name)
        config = backend.config_class.model_validate(settings)
        progress.set_sink(lambda text: conn.send(("progress", text)))
        obtain_artifact(backend, variant, config, model_path, model_fingerprint, calibration, calibration_hash)
        conn.send(("done",))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it as the cell's error
        conn.send(("error", "QBenchError" if isinstance(exc, QBenchError) else type(exc).__name__, str(exc)))
    finally:
        conn.close()


def build_apart(
    plugins,
    backend: Backend,
    variant: str,
    config: VariantConfig,
    model_path: str,
    model_fingerprint: str,
    calibration: Optional[list[list[int]]],
    calibration_hash: Optional[str],
    threads: Optional[int] = None,
    on_progress: Callable[[str], None] = lambda text: None,
) -> None:
    """Build a cell's artifact into the cache in a fresh process (spawned:
    nothing of this process's state, threads or allocator comes along), so
    that whatever the quantization library leaves behind stays out of the
    process that measures. The caller then obtains the artifact as a cache
    hit. The child's errors come back as this process's: a QBenchError as
    one, anything else as a RuntimeError naming its type."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_build_in_child,
        name=f"qbench build {backend.name}:{variant}",
        daemon=True,
        args=(
            child,
            plugins,
            backend.name,
            variant,
            config.settings(),
            model_path,
            model_fingerprint,
            calibration,
            calibration_hash,
            threads,
        ),
    )
    proc.start()
    child.close()
    outcome = None
    try:
        while outcome is None:
            try:
                message = parent.recv()
            except EOFError:  # the child is gone without a word: killed
                break
            if message[0] == "progress":
                on_progress(message[1])
            else:
                outcome = message
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if outcome is None:
        code = proc.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise RuntimeError(
            f"the process building the artifact died ({why}; a signal 9 is most likely the OS out-of-memory killer)"
        )
    if outcome[0] == "error":
        kind, message = outcome[1], outcome[2]
        raise QBenchError(message) if kind == "QBenchError" else RuntimeError(f"{kind}: {message}")
