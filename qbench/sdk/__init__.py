"""The plugin SDK: everything a backend plugin may import, and nothing else.

A plugin imports from ``qbench.sdk`` (or its modules) only; the layers above
it (data, metrics, cell, execute, analyze, present) may change between
releases, and an import-linter contract keeps the built-in plugins off them.

    from qbench.sdk import Artifact, Backend, VariantConfig, hookimpl

    @hookimpl
    def register_backends(register):
        register(MyBackend())

Names load on first use, so that registering a plugin stays cheap: a plugin
that never touches ``HFSession`` never imports torch through the SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> the module that defines it
_EXPORTS = {
    # the hooks
    "hookimpl": "qbench.sdk.hookspecs",
    # the backend contract
    "Artifact": "qbench.sdk.backend",
    "Availability": "qbench.sdk.backend",
    "Backend": "qbench.sdk.backend",
    "LayerQuantizer": "qbench.sdk.backend",
    "ModulePatterns": "qbench.sdk.backend",
    "Session": "qbench.sdk.backend",
    "VariantConfig": "qbench.sdk.backend",
    # errors, dtypes, versions, files, progress
    "QBenchError": "qbench.core.errors",
    "ComputeDtype": "qbench.core.dtypes",
    "DTYPES": "qbench.core.dtypes",
    "device_dtype": "qbench.core.dtypes",
    "torch_dtype": "qbench.core.dtypes",
    "package_version": "qbench.core.environment",
    "file_digest": "qbench.core.io",
    "report_progress": "qbench.core.progress",
    # transformers models: sessions, layers, tokenizers
    "HFSession": "qbench.sdk.hf",
    "adds_bos": "qbench.sdk.hf",
    "linear_layers": "qbench.sdk.hf",
    "meta_skeleton": "qbench.sdk.hf",
    "load_causal_lm": "qbench.sdk.hf",
    "load_tokenizer": "qbench.sdk.hf",
    "planned_layers": "qbench.sdk.hf",
    "replace_module": "qbench.sdk.hf",
    "require_quantized_layers": "qbench.sdk.hf",
    "unique_state_dict": "qbench.sdk.hf",
    "unique_tensor_bytes": "qbench.sdk.hf",
    # KV caches a transformers session can use
    "HF_KV_CACHES": "qbench.sdk.kv",
    # model files
    "embedded_gguf": "qbench.sdk.models",
    "embedded_source": "qbench.sdk.models",
    "fingerprint": "qbench.sdk.models",
    "from_hub": "qbench.sdk.models",
    # mixed-precision recipes
    "Recipe": "qbench.sdk.recipes",
    "load_recipe": "qbench.sdk.recipes",
}
#: the SDK's names that are spelled otherwise where they are defined
_RENAMED = {"report_progress": "report"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"qbench.sdk has no '{name}'")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(_EXPORTS)


__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly
    from qbench.core.dtypes import DTYPES, ComputeDtype, device_dtype, torch_dtype
    from qbench.core.environment import package_version
    from qbench.core.errors import QBenchError
    from qbench.core.io import file_digest
    from qbench.core.progress import report as report_progress
    from qbench.sdk.backend import (
        Artifact,
        Availability,
        Backend,
        LayerQuantizer,
        ModulePatterns,
        Session,
        VariantConfig,
    )
    from qbench.sdk.hf import (
        HFSession,
        adds_bos,
        linear_layers,
        load_causal_lm,
        load_tokenizer,
        meta_skeleton,
        planned_layers,
        replace_module,
        require_quantized_layers,
        unique_state_dict,
        unique_tensor_bytes,
    )
    from qbench.sdk.hookspecs import hookimpl
    from qbench.sdk.kv import HF_KV_CACHES
    from qbench.sdk.models import embedded_gguf, embedded_source, fingerprint, from_hub
    from qbench.sdk.recipes import Recipe, load_recipe
