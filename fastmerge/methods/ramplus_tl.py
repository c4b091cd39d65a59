"""RAM+ (tensor-local): RAM with each model's unique deltas amplified by how much of what it
changes is shared with others (mergekit ``ramplus_tl``; https://arxiv.org/abs/2601.13572)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs
from fastmerge.methods.ram import contributions

CONTRACT = dict(base="required", min_models=0, max_models=None)
PARAMS = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def amplification(shared_k: int, unique_k: int, r: float, alpha: float, epsilon: float) -> float:
    """``lambda_k`` of a model that changes ``shared_k`` elements others change too and
    ``unique_k`` it alone changes (see :func:`reference`)."""
    floor = max(unique_k, epsilon)
    # a model that changes nothing has nothing to amplify (mergekit: 0/0 = nan, see reference)
    rho = shared_k / floor if floor > 0 else (float("inf") if shared_k else 0.0)
    return 1 + r * min(max(rho, 0.0), alpha)


def reference(base, models, *, r=0.1, alpha=0.2, epsilon=1e-5) -> torch.Tensor:
    """With ``d_k``, ``nz_k`` and ``c`` as in :func:`fastmerge.methods.ram.reference`, per model
    (counts over this tensor's elements)::

        shared_k = #(nz_k and c > 1),  unique_k = #(nz_k and c = 1)
        rho_k    = shared_k / max(unique_k, epsilon)
        lambda_k = 1 + r clamp(rho_k, 0, alpha)
        out = base + sum_k nz_k d_k ([c = 1] lambda_k + [c > 1] / c)

    Any finite ``r``, ``alpha`` and ``epsilon`` are accepted, as in mergekit (``alpha < 0``
    clamps to ``alpha``). No models: the base.

    Differences from mergekit: with ``epsilon = 0`` a model whose delta is all zeros has
    ``shared_k = unique_k = 0``; mergekit's ``rho_k = 0/0`` is nan and turns every element
    that another model alone changes into nan, here ``rho_k = 0`` (it contributes nothing).
    """
    b, ms = inputs("ramplus_tl", CONTRACT, base, models)
    r, alpha = V.number(r, "r"), V.number(alpha, "alpha")
    epsilon = V.number(epsilon, "epsilon")
    if not ms:
        return b
    deltas = [m - b for m in ms]
    nz, count = contributions(deltas, epsilon)
    unique, overlap = count == 1, count > 1
    out = b.clone()
    for d, n in zip(deltas, nz):
        lam = amplification(int((n & overlap).sum()), int((n & unique).sum()), r, alpha, epsilon)
        # elements no model changes have n = 0: the divisor's floor of 1 only avoids 0/0
        out += d * n * torch.where(unique, lam, 1 / count.clamp(min=1))
    return out


def fused(ops, base, models, *, out_dtype, r=0.1, alpha=0.2, epsilon=1e-5) -> torch.Tensor:
    """:func:`reference` in two passes (``ops.ram`` with ``amplify``): the per-model counts,
    then the merge with the ``lambda_k`` computed from them, in ``out_dtype``."""
    b, ms = checked("ramplus_tl", CONTRACT, base, models)
    r, alpha = V.number(r, "r"), V.number(alpha, "alpha")
    epsilon = V.number(epsilon, "epsilon")
    return ops.ram(b, ms, epsilon=epsilon, out_dtype=out_dtype,
                   amplify=lambda shared, unique: [amplification(s, u, r, alpha, epsilon)
                                                   for s, u in zip(shared, unique)])
