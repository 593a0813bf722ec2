"""The Python API: what the CLI does, for notebooks and scripts. It only hands
on names; each is documented where it is defined.

    import qbench.api as qb
    table = qb.run(backends=["fp:bf16", "torchao:int8-wo"], suite="smoke")
"""

from qbench.analyze.sensitivity_run import recipe_from_sensitivity
from qbench.analyze.sensitivity_run import run_sensitivity as sensitivity
from qbench.execute.results import find_run, load_results
from qbench.execute.runs import create_run, resume_run, run
from qbench.present.publish import search

__all__ = [
    "run",
    "create_run",
    "resume_run",
    "load_results",
    "find_run",
    "sensitivity",
    "recipe_from_sensitivity",
    "search",
]
