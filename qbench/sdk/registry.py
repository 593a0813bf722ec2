"""Plugin loading: entry points, local plugin folders, and env-var control.

Environment:
  QBENCH_PLUGINS        comma-separated entry-point names to load (allowlist);
                        the word ``builtin`` stands for qbench's own plugins,
                        an empty value loads no entry-point plugin at all.
  QBENCH_BLOCK_PLUGINS  comma-separated entry-point names never to load.
  QBENCH_PLUGINS_DIR    folders (os.pathsep-separated) of one-off ``*.py``
                        plugin files, loaded like ``--plugins-dir``.

Worker processes rebuild the plugin manager from the same settings, which is
why plugins are described by ``PluginSettings`` rather than passed as objects.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pluggy

from qbench.core.errors import QBenchError
from qbench.sdk import hookspecs
from qbench.sdk.backend import Backend

ENTRY_POINT_GROUP = "qbench"
OWN_DISTRIBUTION = "qbench"


@dataclass(frozen=True)
class PluginSettings:
    """Which plugins load; picklable so spawned workers load the same set."""

    plugin_dirs: tuple[str, ...] = ()
    allow: Optional[tuple[str, ...]] = None
    block: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, plugin_dirs: tuple[str, ...] = ()) -> PluginSettings:
        env_dirs = tuple(p for p in os.environ.get("QBENCH_PLUGINS_DIR", "").split(os.pathsep) if p)
        allow_env = os.environ.get("QBENCH_PLUGINS")
        allow = None if allow_env is None else tuple(n.strip() for n in allow_env.split(",") if n.strip())
        block = tuple(n.strip() for n in os.environ.get("QBENCH_BLOCK_PLUGINS", "").split(",") if n.strip())
        dirs = tuple(str(Path(d).resolve()) for d in (*env_dirs, *plugin_dirs))
        return cls(plugin_dirs=dirs, allow=allow, block=block)


@dataclass
class LoadedPlugins:
    pm: pluggy.PluginManager
    backends: dict[str, Backend]
    #: backend name -> the plugin that registered it (entry point or file)
    origin: dict[str, str] = field(default_factory=dict)


def _wanted(ep: importlib.metadata.EntryPoint, settings: PluginSettings) -> bool:
    if settings.allow is None:
        return True
    own = ep.dist is not None and ep.dist.name == OWN_DISTRIBUTION
    return ep.name in settings.allow or ("builtin" in settings.allow and own)


def _load_file(path: Path):
    module_name = f"qbench_local_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise QBenchError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_plugins(settings: Optional[PluginSettings] = None) -> LoadedPlugins:
    """Build a plugin manager, load plugins, validate hooks, collect backends."""
    settings = settings or PluginSettings.from_env()
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)

    for name in settings.block:
        pm.set_blocked(name)  # pluggy then refuses to register it under that name
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or not _wanted(ep, settings) or pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin must not end qbench with exit 0
            raise QBenchError(
                f"plugin '{ep.name}' ({ep.value}) failed to load: {_one_line(exc)}; "
                f"fix or uninstall it, or skip it with QBENCH_BLOCK_PLUGINS={ep.name}"
            ) from None

    for folder in settings.plugin_dirs:
        folder_path = Path(folder)
        if not folder_path.is_dir():
            raise QBenchError(f"plugins folder not found: {folder}; pass an existing folder to --plugins-dir")
        for path in sorted(folder_path.glob("*.py")):
            try:
                module = _load_file(path)
                pm.register(module, name=f"file:{path}")
            except (QBenchError, KeyboardInterrupt):
                raise
            except BaseException as exc:  # SystemExit too: a plugin must not end qbench with exit 0
                raise QBenchError(
                    f"plugin file {path} failed to import: {_one_line(exc)}; fix it or remove it from "
                    "the plugins folder"
                ) from None

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise QBenchError(
            f"{exc}; known hooks: {', '.join(_known_hooks())}. Rename the function or drop its @hookimpl"
        ) from None

    backends: dict[str, Backend] = {}
    origin: dict[str, str] = {}
    # Call each implementation ourselves so a duplicate name can name both plugins.
    for impl in pm.hook.register_backends.get_hookimpls():

        def register(backend: Backend, _plugin=impl.plugin_name) -> None:
            if not isinstance(backend, Backend):
                raise QBenchError(f"plugin '{_plugin}' registered {backend!r}, which is not a qbench Backend")
            if backend.name in backends:
                raise QBenchError(
                    f"backend name '{backend.name}' registered twice, by '{origin[backend.name]}' and '{_plugin}'; "
                    f"block one with QBENCH_BLOCK_PLUGINS"
                )
            backends[backend.name] = backend
            origin[backend.name] = _plugin

        try:
            impl.function(register=register)
        except (QBenchError, KeyboardInterrupt):
            raise
        except BaseException as exc:
            raise QBenchError(
                f"plugin '{impl.plugin_name}' failed in register_backends: {_one_line(exc)}; fix it "
                f"or block it with QBENCH_BLOCK_PLUGINS"
            ) from None
    return LoadedPlugins(pm=pm, backends=backends, origin=origin)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _known_hooks() -> list[str]:
    return sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "qbench_spec"))


def get_backend(loaded: LoadedPlugins, name: str) -> Backend:
    try:
        return loaded.backends[name]
    except KeyError:
        known = ", ".join(sorted(loaded.backends)) or "(none loaded)"
        raise QBenchError(f"unknown backend '{name}': known backends are {known} (see `qbench backends`)") from None
