"""SCE: Select (top-variance elements), Calculate (per-model weights), Erase (minority signs)
(mergekit ``sce``; Wan et al. 2024, FuseChat, https://arxiv.org/abs/2408.07990)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs

CONTRACT = dict(base="required", min_models=0, max_models=None)
PARAMS = {"int8_mask": False, "select_topk": 1.0}
KERNELS = ("cpu", "triton", "cuda")


def select_mask(deltas: list, select_topk: float) -> torch.Tensor:
    """The elements of largest variance across the models: ``k = int(nonzero * select_topk)``
    of them (in fp32, as mergekit computes it), ``nonzero`` the count of elements whose
    variance is not 0; ties at the cut go to the lowest flat index."""
    if select_topk <= 0 or deltas[0].numel() == 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    var = torch.var(torch.stack(deltas), dim=0, unbiased=False).reshape(-1)
    k = int(torch.count_nonzero(var) * select_topk)
    keep = torch.zeros_like(var, dtype=torch.bool)
    keep[torch.sort(var, descending=True, stable=True).indices[:k]] = True
    return keep.reshape(deltas[0].shape)


def reference(base, models, *, int8_mask=False, select_topk=1.0) -> torch.Tensor:
    """For K models with deltas ``d_k = m_k - base``:

    1. Select (``select_topk < 1``): keep in every ``d_k`` only the elements of the
       ``select_topk`` fraction (of the elements where the models differ) with the largest
       population variance ``var_k(d_k)`` (:func:`select_mask`); ``select_topk <= 0`` keeps
       none, ``>= 1`` all. One model has variance 0 everywhere, so any ``select_topk < 1``
       keeps none of it.
    2. Calculate: ``w_k = mean(d_k^2) / sum_j mean(d_j^2)``, or ``1/K`` when
       ``|sum_j mean(d_j^2)| < 1e-6`` (mergekit's guard: small deltas get equal weights).
    3. Erase: ``keep_k = sign(d_k) == (+1 if sum_j d_j >= 0 else -1)`` (TIES' sign election by
       sum; zeros are never kept).

    ``out = base + sum_k w_k keep_k d_k / max(sum_k w_k keep_k, 1e-6)``; no models: the base.
    ``int8_mask`` only sets the dtype mergekit stores its masks in and changes nothing here.

    Differences from mergekit: ties of variance at the top-k cut go to the lowest flat index
    (mergekit's ``torch.topk`` leaves their order unspecified).
    """
    b, ms = inputs("sce", CONTRACT, base, models)
    V.flag(int8_mask, "int8_mask")
    select_topk = V.number(select_topk, "select_topk")
    if not ms:
        return b
    deltas = [m - b for m in ms]
    if select_topk < 1:
        keep = select_mask(deltas, select_topk)
        deltas = [d * keep for d in deltas]
    energy = torch.stack([d.square().mean() for d in deltas])
    total = float(energy.sum())
    w = torch.full_like(energy, 1 / len(ms)) if abs(total) < 1e-6 else energy / total
    majority = torch.where(sum(deltas) >= 0, 1.0, -1.0)
    kept = [(d.sign() == majority) * wk for d, wk in zip(deltas, w)]
    merged = sum(d * kw for d, kw in zip(deltas, kept))
    return b + merged / sum(kept).clamp(min=1e-6)


def fused(ops, base, models, *, out_dtype, int8_mask=False, select_topk=1.0) -> torch.Tensor:
    """:func:`reference` from the kernels ``ops`` (``ops.sce``), in ``out_dtype``: one reduction
    pass (the energies; with ``0 < select_topk < 1`` also the exact top-k of the variance, ties
    to the lowest index, as keep bits), the weights on the host, one merge pass."""
    b, ms = checked("sce", CONTRACT, base, models)
    V.flag(int8_mask, "int8_mask")
    select_topk = V.number(select_topk, "select_topk")
    return ops.sce(b, ms, select_topk=select_topk, out_dtype=out_dtype)
