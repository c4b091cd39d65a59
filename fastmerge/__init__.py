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

__version__ = "0.1.0"

# fastmerge.<method>(base, models, ...) for every registered method (fastmerge.ties, ...)
globals().update({name: getattr(api, name) for name in METHODS})
# fastmerge.emr is EMR-Merging with its masks and rescalers (fastmerge.merge("emr", ...) is its
# unified model only); fastmerge.fisher and fastmerge.regmean take the per-model statistics
# (their registry entries are fastmerge merge's, which reads those from files)
from .research import emr, fisher, tall_masks  # noqa: E402
from . import opcm  # noqa: E402
from .regmean import SingularGramError, regmean, regmean_state_dicts  # noqa: E402


def load_emr(folder: str, base):
    """EMR-Merging's result as ``fastmerge merge`` (``merge_method: emr``) saved it in
    ``folder``, with the base model (a folder or a state dict): see
    :func:`fastmerge.streaming.load_emr`."""
    from .streaming import load_emr as load  # the checkpoint layer, imported only when used

    return load(folder, base)

# (emr is also a registered method: its name appears twice, which import * does not mind)
__all__ = ["merge", *METHODS, "ops", "peft", "lowrank", "quant", "backends", "METHODS",
           "NonFiniteError", "research", "tall_masks", "emr", "fisher", "load_emr", "opcm", "regmean",
           "regmean_state_dicts", "SingularGramError", "__version__"]
