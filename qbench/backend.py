"""Where the backend contract lived before the plugin SDK (``qbench.sdk.backend``):
kept so that plugins written against ``qbench.backend`` still load. New code
imports from ``qbench.sdk``."""

from qbench.sdk.backend import *  # noqa: F401,F403
