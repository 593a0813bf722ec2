"""Where the transformers helpers lived before the plugin SDK (``qbench.sdk.hf``):
kept so that plugins written against ``qbench.hf`` still load. New code
imports from ``qbench.sdk``."""

from qbench.sdk.hf import *  # noqa: F401,F403
