"""Arcee Fusion: keep the model's changes only where their importance (size times the KL
divergence of the rows' softmax) is an outlier (mergekit ``arcee_fusion``; https://arcee.ai)."""
from __future__ import annotations

import torch

from fastmerge.methods._common import checked, inputs

CONTRACT = dict(base="required", min_models=1, max_models=1)
PARAMS = {}
KERNELS = ("cpu", "triton", "cuda")


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base| * KL(p || q)`` with ``p = softmax(model) + 1e-8`` and
    ``q = softmax(base) + 1e-8`` along the last dimension (one KL per row)."""
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * kl


def order_statistic(x: torch.Tensor, q: float) -> torch.Tensor:
    """mergekit's quantile: the ``floor(q (n - 1))``-th smallest element (0-based) of ``x``."""
    n = x.numel()
    return torch.kthvalue(x.reshape(-1), int(q * (n - 1)) + 1).values


def reference(base, models) -> torch.Tensor:
    """``out = base + (m - base) * [s >= median(s) + 1.5 (q3(s) - q1(s))]``, ``m = models[0]``,
    ``s = importance(m, base)`` and the quartiles the order statistics ``floor(q (n - 1))``
    (0-based, ``q`` = 0.25, 0.5, 0.75) of all ``n`` elements of ``s``.

    Differences from mergekit (by design): above 10^6 elements mergekit estimates the quartiles
    from 10^6 elements drawn with ``torch.randint`` (a different threshold on every run); here
    they are exact, over all elements, so the result is deterministic. At or below 10^6 elements
    the two agree. A 0-size tensor returns the base (mergekit raises IndexError).
    """
    b, (m,) = inputs("arcee_fusion", CONTRACT, base, models)
    if b.numel() == 0:
        return b
    s = importance(m, b)
    q1, median, q3 = (order_statistic(s, q) for q in (0.25, 0.5, 0.75))
    return b + (m - b) * (s >= median + 1.5 * (q3 - q1))


def fused(ops, base, models, *, out_dtype) -> torch.Tensor:
    """:func:`reference` from the kernels ``ops`` (``ops.arcee_fusion``), in ``out_dtype``: one
    pass for the rows' KL and the exact quartiles of ``s`` (a histogram of its order keys, then
    the few elements of the quartiles' bins), one merge pass. ``s`` differs from the reference's
    by fp32 round-off (exp, log and the sums are computed differently), so an element whose
    ``s`` lies within round-off of the threshold may be kept on one side and not the other."""
    b, (m,) = checked("arcee_fusion", CONTRACT, base, models)
    return ops.arcee_fusion(b, m, out_dtype=out_dtype)
