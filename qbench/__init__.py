"""qbench: benchmark quantization backends on the same tokens.

``qbench.run`` and ``qbench.load_results`` come from the API (``qbench.api``);
``hookimpl``, ``Backend`` and the rest of the plugin SDK from ``qbench.sdk``.
Both load on first use, so that a plugin's ``from qbench import hookimpl``
stays cheap.
"""

__version__ = "0.1.0"

from qbench.sdk.hookspecs import hookimpl  # noqa: E402

_API = ("run", "load_results")


def __getattr__(name: str):
    if name in _API:
        from qbench import api

        return getattr(api, name)
    from qbench import sdk

    if name in sdk.__all__:
        return getattr(sdk, name)
    raise AttributeError(f"module 'qbench' has no attribute '{name}'")


__all__ = ["hookimpl", "run", "load_results", "__version__"]
