"""The plugin contract of qbench.

Every hook is called with keyword arguments only. A plugin implements a hook by
decorating a function of the same name with ``qbench.hookimpl``; a misspelled
name is reported by ``check_pending()`` when plugins load, never ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from qbench.sdk.backend import Backend

hookspec = pluggy.HookspecMarker("qbench")
#: Marks a plugin's implementation of a hook: ``@hookimpl def register_backends(register): ...``
hookimpl = pluggy.HookimplMarker("qbench")


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Register quantization backends.

    Call ``register(backend)`` once per ``qbench.sdk.backend.Backend`` instance. The
    backend's ``name`` must be unique across all loaded plugins: registering a
    name twice is an error naming both plugins. The object does all the work
    (variants, availability, quantize, load); the hook only announces it, so
    registering must be cheap and must not import heavy optional packages.
    """
