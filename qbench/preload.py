"""What the worker processes' fork server imports once (see
qbench.runner.worker_context): the libraries every cell needs, about 2 s of
imports per worker otherwise. Backend libraries are not preloaded: each
worker imports its own, after its settings (environment variables) apply.
Importing these starts no threads and touches no GPU, so forking after it is
safe."""

import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import qbench.worker  # noqa: F401
import qbench.workload  # noqa: F401
