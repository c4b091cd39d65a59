"""Model Stock: move from the base toward the models' average by an amount set by the angle
between their deltas (mergekit ``model_stock``; Jang et al. 2024, https://arxiv.org/abs/2403.19522)."""
from __future__ import annotations

import itertools

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs, model_names

CONTRACT = dict(base="required", min_models=2, max_models=None)
PARAMS = {"filter_wise": False}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def reference(base, models, *, filter_wise=False) -> torch.Tensor:
    """``t * mean_k(m_k) + (1 - t) * base`` with, for K models and deltas ``d_k = m_k - base``::

        cos = mean over pairs j < k of clamp(d_j . d_k / max(|d_j| |d_k|, 1e-6), -1, 1)
        t   = K cos / (1 + (K - 1) cos)       (t = 0, the base, where |1 + (K - 1) cos| < 1e-6)

    One ``cos`` for the whole tensor, or with ``filter_wise`` one per vector along the last
    dimension (per row of a matrix; a 1-D tensor is one row, a 0-d one a single element).
    Zero deltas give ``cos = 0`` and so ``t = 0``.

    Differences from mergekit: none.
    """
    b, ms = inputs("model_stock", CONTRACT, base, models)
    filter_wise = V.flag(filter_wise, "filter_wise")
    shape = b.shape
    if not filter_wise:  # (mergekit's unsqueeze of 1-D tensors under filter_wise changes nothing)
        b, ms = b.reshape(-1), [m.reshape(-1) for m in ms]
    deltas = [m - b for m in ms]
    cosines = []
    for dj, dk in itertools.combinations(deltas, 2):
        norms = torch.linalg.vector_norm(dj, dim=-1) * torch.linalg.vector_norm(dk, dim=-1)
        cosines.append(((dj * dk).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = (sum(cosines) / len(cosines)).unsqueeze(-1)
    K = len(ms)
    denominator = 1 + (K - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, K * cos / torch.where(singular, 1.0, denominator))
    average = sum(ms) / K
    return (t * average + (1 - t) * b).reshape(shape)


def fused(ops, base, models, *, out_dtype, filter_wise=False) -> torch.Tensor:
    """:func:`reference` from the kernels ``ops``: one Gram pass of the deltas (whole tensor or
    per last-dim row) gives every pair's ``cos = clamp(G_jk / max(n_j n_k, 1e-6), -1, 1)`` and
    so ``t`` per vector (float64), then one pass writes ``sum_k (t / K) m_k + (1 - t) base``."""
    b, ms = checked("model_stock", CONTRACT, base, models)
    filter_wise = V.flag(filter_wise, "filter_wise")
    along = "last" if filter_wise else "all"
    names = model_names(len(ms))
    g = ops.gram(ms, names, base=b, along=along)
    norms = g.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    cosines = [(g[:, j, k] / (norms[:, j] * norms[:, k]).clamp(min=1e-6)).clamp(-1, 1)
               for j, k in itertools.combinations(range(len(ms)), 2)]
    cos = sum(cosines) / len(cosines)
    K = len(ms)
    denominator = 1 + (K - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, K * cos / torch.where(singular, 1.0, denominator))
    return ops.lincomb(ms, names, (t / K).unsqueeze(1).expand(-1, K), base=b, base_coef=1 - t,
                       along=along, out_dtype=out_dtype)
