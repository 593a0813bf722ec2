"""What the worker processes' fork server imports once (see
qbench.execute.runner.worker_context): the libraries every cell needs, which each
worker would otherwise import again. Backend libraries are not preloaded on
purpose: each worker imports its own, after its settings apply (hqq comes in
only because transformers' config validation imports it). Importing these
starts no threads and touches no GPU, so forking after it is safe; that is
why ``transformers.modeling_utils`` stays out (it imports torchao, which
starts a thread).

transformers resolves its modules lazily: ``AutoTokenizer`` alone leaves the
config validators and the fast tokenizer to the first call, about 2 s of
imports in every worker (a cell and each of its latency trials) on a 2-core
CPU, more than a smoke cell's tokenizing."""

import torch  # noqa: F401
import transformers  # noqa: F401
import transformers.generation  # noqa: F401
import transformers.models.llama.configuration_llama  # noqa: F401  (the embedded model's)
import transformers.utils.type_validators  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

import qbench.cell.worker  # noqa: F401
import qbench.data.workload  # noqa: F401
