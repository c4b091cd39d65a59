"""fastmerge: fused model-merging kernels (TIES, DARE, DELLA, breadcrumbs, task arithmetic) and
low-rank SVD merges (TSV-Merge, Iso-C, Iso-CTS; ``fastmerge.lowrank``).

    import fastmerge
    merged = fastmerge.ties(base, [m1, m2, m3], weights=[1.0, 0.5, 0.5], density=0.2)

See README.md for the API, the backends and how to read a benchmark.
"""
from . import lowrank, ops, peft, quant
from .api import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    iso_c,
    iso_cts,
    linear,
    merge,
    task_arithmetic,
    ties,
    tsv,
)
from ._semantics import METHODS
from ._validate import NonFiniteError
from .dispatch import backends

__version__ = "0.1.0"

__all__ = [
    "merge", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "linear", "tsv", "iso_c", "iso_cts", "ops", "peft",
    "lowrank", "quant", "backends", "METHODS", "NonFiniteError",
    "__version__",
]
