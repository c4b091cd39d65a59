"""fastmerge: fused model-merging kernels (TIES, DARE, DELLA, breadcrumbs, task arithmetic) and
low-rank SVD merges (TSV-Merge, Iso-C, Iso-CTS; ``fastmerge.lowrank``).

    import fastmerge
    merged = fastmerge.ties(base, [m1, m2, m3], weights=[1.0, 0.5, 0.5], density=0.2)

See README.md for the API, the backends and how to read a benchmark.
"""
from . import api, backends, lowrank, ops, peft, quant
from . import library  # noqa: F401  (registers the torch.library ops)
from ._registry import METHODS
from ._validate import NonFiniteError
from .api import merge
from . import research
from .research import emr, fisher, tall_masks

__version__ = "0.1.0"

# fastmerge.<method>(base, models, ...) for every registered method (fastmerge.ties, ...)
globals().update({name: getattr(api, name) for name in METHODS})

__all__ = ["merge", *METHODS, "ops", "peft", "lowrank", "quant", "backends", "METHODS",
           "NonFiniteError", "research", "tall_masks", "emr", "fisher", "__version__"]
