"""fastmerge: fused model-merging kernels (TIES, DARE, DELLA, breadcrumbs, task arithmetic).

    import fastmerge
    merged = fastmerge.ties(base, [m1, m2, m3], weights=[1.0, 0.5, 0.5], density=0.2)

See README.md for the API, the backends and how to read a benchmark.
"""
from . import ops, peft
from .api import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    linear,
    merge,
    task_arithmetic,
    ties,
)
from ._semantics import METHODS
from ._validate import NonFiniteError
from .dispatch import backends

__version__ = "0.1.0"

__all__ = [
    "merge", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "linear", "ops", "peft", "backends", "METHODS", "NonFiniteError",
    "__version__",
]
