"""Backend-independent meaning of every merge: method table, defaults, and per-model masks.

Both the ``torch`` reference and the fused backends execute a :class:`Plan`; everything that
decides *what* is computed (how many elements a density keeps, which ranks breadcrumbs keeps,
the keep probabilities of DELLA) lives here, once.

Total order used by every magnitude-based selection ("priority order"): larger ``|delta|``
first; among equal magnitudes, the lower flat index first. Top-k keeps the first ``k``
positions of that order, so exactly ``k`` elements are kept and ties at the threshold are
broken by lowest flat index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ._registry import REGISTRY

# mergekit 0.1.5 generalized task arithmetic (registry.py), read off fastmerge's registry:
# {method: (consensus, sparsification, default normalize, default rescale)}
MERGEKIT_METHODS = {m.name: (m.consensus, m.sparsify, m.normalize, m.rescale)
                    for m in REGISTRY.values() if m.family == "gta"}
RESCALE_NORMS = ("l1", "l2", "linf", "density")
NORM_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no norm matching below this


@dataclass(frozen=True)
class MaskSpec:
    """How one model's delta is sparsified.

    kind: ``none`` (kept whole), ``zero`` (dropped whole), ``range`` (keep priority positions
    ``start <= pos < stop``), ``random`` (keep with probability ``p``), ``della`` (keep with
    probability ``c1 + rn * c2`` from the row rank, see :mod:`fastmerge.philox`), ``given``
    (keep where the bool tensor ``keep`` is True: a random mask drawn by the caller, e.g. with
    a library's own ``torch.bernoulli`` calls; ``density`` is its keep probability).
    factor: ``given`` masks only: the norm-matching factor of a norm ``rescale`` as the caller
    computed it (None: from the norms, as for every other mask).
    """

    kind: str
    start: int = 0
    stop: int = 0
    p: float = 1.0
    c1: float = 0.0
    c2: float = 0.0
    density: float = 1.0
    keep: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    factor: Optional[float] = None


def given_mask(keep: torch.Tensor, density: float, factor: Optional[float] = None) -> MaskSpec:
    """A random mask drawn by the caller: keep where ``keep`` (a bool tensor of the input's
    shape); ``density`` is the probability it was drawn with (DARE's ``1/density`` rescale)."""
    return MaskSpec("given", p=fp32(density), density=density, keep=keep, factor=factor)


@dataclass
class Plan:
    """Everything a backend needs to run one merge of K inputs (with or without a base)."""

    masks: list  # list[MaskSpec], one per model
    weights: list  # python floats, rounded to fp32 by the backends
    rescale: Optional[str] = None  # None | l1 | l2 | linf | density (applied to kept values)
    consensus: Optional[str] = None  # None | sum | count
    elect_weighted: bool = True  # elect on w_k * t_k (mergekit) or on t_k (PEFT)
    # none | weight (sum w*mask, 0 -> 1) | count (max(sum mask, 1)) | sumw (sum w, |.| < 1e-8 -> 1)
    # | sumw_exact (sum w as is: mergekit's linear)
    divisor: str = "none"
    normalize: bool = False
    lam: float = 1.0
    seed: int = 0
    names: Optional[list] = None  # input names for error messages (default models[k])
    # the weights as an fp32 [K] tensor with an autograd graph (learnable coefficients), or None;
    # only the torch backend uses it (dispatch sends such plans there under auto)
    weight_grad: Optional[torch.Tensor] = None

    @property
    def needs_norms(self) -> bool:
        return self.rescale in ("l1", "l2", "linf") and any(
            m.kind in ("range", "random", "della", "given") for m in self.masks
        )


def rescale_mode(rescale, default: bool) -> Optional[str]:
    """``rescale=`` as a plan's norm: None/True/False/one of ``RESCALE_NORMS``; True is
    mergekit's L1 norm matching."""
    if rescale is None:
        rescale = default
    if rescale is True:
        return "l1"
    if rescale is False:
        return None
    if isinstance(rescale, str) and rescale in RESCALE_NORMS:
        return rescale
    raise ValueError(f"rescale must be a bool or one of {RESCALE_NORMS}; got {rescale!r}")


def fp32(x: float) -> float:
    """Round a Python float to the nearest fp32 value (what the kernels see)."""
    return float(torch.tensor(x, dtype=torch.float32))


def norm_scale(before: float, after: float) -> Optional[float]:
    """Norm-matching factor ``|d| / |mask * d|`` rounded to fp32; None (no rescale) when either
    norm is below ``NORM_EPS``."""
    if before < NORM_EPS or after < NORM_EPS:
        return None
    return fp32(before / after)


def weight_sum_divisor(plan: "Plan") -> Optional[float]:
    """The divisor of merges without consensus: ``sum_k w_k`` added in fp32 in model order;
    for ``sumw`` a sum with ``|.| < 1e-8`` becomes 1 (mergekit). None for other divisors."""
    if plan.divisor not in ("sumw", "sumw_exact"):
        return None
    wsum = torch.zeros((), dtype=torch.float32)
    for w in plan.weights:
        wsum = wsum + torch.tensor(w, dtype=torch.float32)
    if plan.divisor == "sumw" and abs(float(wsum)) < 1e-8:
        return 1.0
    return float(wsum)


def magnitude_mask(density: float, n: int, convention: str = "mergekit") -> MaskSpec:
    """Top-k by magnitude. mergekit: ``k = max(1, int(density*n))``; PEFT: ``k = int(density*n)``."""
    if density >= 1:
        return MaskSpec("none", density=density)
    if convention == "peft":
        return MaskSpec("range", 0, int(density * n), density=density)
    if density <= 0 or n == 0:
        return MaskSpec("zero", density=density)
    return MaskSpec("range", 0, max(1, int(density * n)), density=density)


def outlier_mask(density: float, gamma: float, n: int) -> MaskSpec:
    """Model Breadcrumbs (mergekit ``magnitude_outliers``): drop the ``int(gamma*n)`` largest,
    then the smallest, so that ``int(density*n)`` remain; when too few would remain the
    outlier removal shrinks (``n_bot = max(0, n - target - n_top)``)."""
    if density >= 1:
        return MaskSpec("none", density=density)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    start = n - n_bot - target
    return MaskSpec("range", start, start + target, density=density)


def random_mask(density: float) -> MaskSpec:
    """DARE: keep each element independently with probability ``density``."""
    if density >= 1:
        return MaskSpec("none", density=density)
    return MaskSpec("random", p=fp32(density), density=density)


def della_mask(density: float, epsilon: float) -> MaskSpec:
    """DELLA-Merging (Deep et al. 2024, arXiv:2406.11617) as mergekit's ``della_magprune``:
    keep probability ``(density - eps) + rank_norm * 2 * eps`` with ``rank_norm`` the
    ascending magnitude rank in the row scaled to [0, 1]."""
    if density >= 1:
        return MaskSpec("none", density=density)
    if density <= 0:
        return MaskSpec("zero", density=density)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"epsilon must be chosen such that density +/- epsilon is in (0, 1); got "
            f"density={density}, epsilon={epsilon}"
        )
    return MaskSpec("della", c1=fp32(density - epsilon), c2=fp32(2 * epsilon), density=density)


def rows_of(shape: Sequence[int]) -> tuple[int, int, int]:
    """DELLA ranks along dim 1 (mergekit: ``argsort(dim=1)``; 1-D tensors are one row).
    Returns ``(outer, length, inner)`` so that element ``(o, t, j)`` sits at flat index
    ``(o * length + t) * inner + j`` and a row is ``t = 0..length-1``."""
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, int(shape[0]), 1
    inner = math.prod(shape[2:]) if len(shape) > 2 else 1
    return int(shape[0]), int(shape[1]), int(inner)
