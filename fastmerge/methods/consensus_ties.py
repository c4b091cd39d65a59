"""Consensus TIES: TIES-merging restricted to the weights at least ``k`` TALL masks keep, the
masks taken against the TIES multi-task vector (Wang et al. 2024, "Localizing Task Information
for Improved Model Merging and Compression", ICML 2024, https://arxiv.org/abs/2405.07813; code:
github.com/nik-dim/tall_masks with ``use_ties``)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs
from fastmerge.methods.consensus_ta import consensus_keep, consensus_params, tall_masks

CONTRACT = dict(base="required", min_models=1, max_models=None)
# density 0.2: the code's TIES keeps the top 20% (reset_thresh=20); normalize False: its
# ties_agg "sum" (disjoint sum); k and tall_lambda as consensus_ta
# threshold: per-model magnitudes kept (|tau| >= threshold) instead of a density share: a
# whole-model trim (fastmerge merge's topk_scope: model, the tall_masks code's flattened TIES)
PARAMS = {"k": 2, "tall_lambda": 0.6, "lam": 1.0, "density": 0.2, "normalize": False, "threshold": None}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def top_k_count(density: float, n: int) -> int:
    """mergekit's magnitude sparsification size: all for ``density >= 1``, none for ``<= 0``,
    else ``max(1, int(density * n))``."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def top_k_keep(d: torch.Tensor, k: int) -> torch.Tensor:
    """The exact top ``k`` of ``|d|``, ties to the lowest flat index."""
    flat = d.reshape(-1).abs()
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=d.device)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return keep.reshape(d.shape)


def trim_params(K: int, density, threshold):
    """``(densities, thresholds or None)``; a threshold replaces the density (then left at its
    default)."""
    densities = V.per_model(density, K, "density", 0.0, 1.0)
    if threshold is None:
        return densities, None
    if density != PARAMS["density"]:
        raise ValueError("give either density or threshold, not both")
    return densities, V.per_model(threshold, K, "threshold", 0.0)


def ties_vector(deltas: list, densities: list, normalize: bool, thresholds=None) -> torch.Tensor:
    """The TIES multi-task vector (weights 1): trim each ``tau_t`` to its top-k magnitudes (or,
    with ``thresholds``, to ``|tau_t| >= threshold_t``), elect the sign of their sum (``>= 0``:
    +), sum the trimmed values that agree with it (``normalize``: divided by their count, at
    least 1)."""
    n = deltas[0].numel()
    if thresholds is not None:
        trimmed = [d * (d.abs() >= t) for d, t in zip(deltas, thresholds)]
    else:
        trimmed = [d * top_k_keep(d, top_k_count(p, n)) for d, p in zip(deltas, densities)]
    positive = sum(trimmed) >= 0
    agree = [torch.where(positive, t > 0, t < 0) for t in trimmed]
    total = sum(t * a for t, a in zip(trimmed, agree))
    if not normalize:
        return total
    return total / sum(a.float() for a in agree).clamp(min=1)


def reference(base, models, *, k=2, tall_lambda=0.6, lam=1.0, density=0.2, normalize=False,
              threshold=None) -> torch.Tensor:
    """With task vectors ``tau_t = models[t] - base`` (fp32):

    1. ``tau_TIES``: TIES with weights 1 (:func:`ties_vector`: top ``density`` of each
       ``|tau_t|``, exact, ties to the lowest index; sign of the sum; disjoint sum, or mean
       with ``normalize``);
    2. TALL masks ``m_t = |tau_t| > lambda_t |tau_TIES - tau_t|`` on the untrimmed
       ``tau_t`` (:func:`~fastmerge.methods.consensus_ta.tall_masks`);
    3. ``out = base + lam * (tau_TIES * [sum_t m_t >= k])``.

    ``threshold`` (one magnitude or one per model) trims ``|tau_t| >= threshold_t`` instead of
    a ``density`` share: ``fastmerge merge``'s ``topk_scope: model`` finds them over the whole
    model, as the tall_masks code trims its flattened model (FusionBench's TIES convention).

    Differences from the paper's code: its TIES trims with ``|tau| >= kthvalue`` (the top
    ``int(density n)`` plus the value at the cut and its ties: one element more per task on
    distinct magnitudes) and resolves a zero sum to the overall majority sign; here TIES is
    mergekit's (exact top ``max(1, int(density n))``, zero sum counted positive), as
    ``fastmerge.merge("ties", ...)`` computes it. The masks come from the task vectors rather
    than the weights (fp32 round-off), with a given ``tall_lambda`` (see consensus_ta).
    """
    b, ms = inputs("consensus_ties", CONTRACT, base, models)
    k, lambdas, lam = consensus_params("consensus_ties", len(ms), k, tall_lambda, lam)
    densities, thresholds = trim_params(len(ms), density, threshold)
    normalize = V.flag(normalize, "normalize")
    deltas = [m - b for m in ms]
    mtl = ties_vector(deltas, densities, normalize, thresholds)
    keep = consensus_keep(tall_masks(deltas, mtl, lambdas), k)
    return b + lam * (mtl * keep)


def fused(ops, base, models, *, out_dtype, k=2, tall_lambda=0.6, lam=1.0, density=0.2,
          normalize=False, threshold=None) -> torch.Tensor:
    """:func:`reference` from the exact top-k select (one radix select over the ``|tau_t|``;
    none with ``threshold``), then one pass over the inputs (``ops.consensus`` with the cuts),
    in ``out_dtype``."""
    b, ms = checked("consensus_ties", CONTRACT, base, models)
    k, lambdas, lam = consensus_params("consensus_ties", len(ms), k, tall_lambda, lam)
    densities, thresholds = trim_params(len(ms), density, threshold)
    normalize = V.flag(normalize, "normalize")
    n = b.numel()
    return ops.consensus(b, ms, k=k, tall_lambda=lambdas, lam=lam, out_dtype=out_dtype,
                         top_k=[top_k_count(p, n) for p in densities], normalize=normalize,
                         thresholds=thresholds)
