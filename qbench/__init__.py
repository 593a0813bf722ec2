"""qbench: benchmark quantization backends on the same tokens."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("qbench")


def __getattr__(name: str):
    # Lazy, so that `from qbench import hookimpl` in a plugin stays cheap.
    if name in ("run", "load_results"):
        from qbench import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["hookimpl", "run", "load_results", "__version__"]
