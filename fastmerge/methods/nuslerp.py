"""NuSLERP: SLERP of two models (or of their deltas from a base), whole-tensor or per row
(mergekit ``nuslerp``; https://en.wikipedia.org/wiki/Slerp)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import REQUIRED, checked, inputs, model_names

CONTRACT = dict(base="optional", min_models=2, max_models=2)
PARAMS = {"weights": REQUIRED, "nuslerp_row_wise": False, "nuslerp_flatten": True}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)

NORM_EPS = 1e-7  # mergekit's norm floor when normalizing
EPS = 1e-8       # collinear when 1 - cos^2 <= EPS^2


def _slerp_last_dim(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of each vector along the last dimension."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= EPS ** 2
    theta = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(collinear, (1 - t) * v0 + t * v1, spherical)


def _params(weights, nuslerp_row_wise, nuslerp_flatten):
    """``(t, row_wise, flatten)``, checked."""
    w0, w1 = V.per_model(weights, 2, "weights")
    row_wise = V.flag(nuslerp_row_wise, "nuslerp_row_wise")
    flatten = V.flag(nuslerp_flatten, "nuslerp_flatten")
    total = w0 + w1
    return (0.5 if abs(total) < 1e-6 else w1 / total), row_wise, flatten


def reference(base, models, *, weights, nuslerp_row_wise=False,
              nuslerp_flatten=True) -> torch.Tensor:
    """``base + slerp(t; m0 - base, m1 - base)``, or ``slerp(t; m0, m1)`` without a base, with
    ``t = w1 / (w0 + w1)`` (``t = 0.5`` when ``|w0 + w1| < 1e-6``); ``weights`` are any finite
    ``[w0, w1]`` (a scalar means equal weights).

    The vectors slerped: the whole tensor when ``nuslerp_flatten`` (the default; then
    ``nuslerp_row_wise`` is ignored), else each vector along the last dimension, or along
    dimension 0 when ``nuslerp_row_wise`` (a 1-D tensor is one vector either way). Per vector,
    with ``u = v / max(|v|, 1e-7)``, ``cos = clamp(u0 . u1, -1, 1)``, ``theta = acos(cos)``::

        1 - cos^2 <= 1e-16:  (1 - t) v0 + t v1          (collinear or antipodal)
        otherwise:           (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)

    A zero vector has cosine 0 with anything, so the spherical branch runs with
    ``theta = pi/2``, as in mergekit.

    Differences from mergekit: none.
    """
    b, (m0, m1) = inputs("nuslerp", CONTRACT, base, models)
    t, row_wise, flatten = _params(weights, nuslerp_row_wise, nuslerp_flatten)
    v0, v1 = (m0, m1) if b is None else (m0 - b, m1 - b)
    shape = v0.shape
    if flatten:
        out = _slerp_last_dim(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    elif row_wise and v0.dim() > 1:
        out = _slerp_last_dim(t, v0.movedim(0, -1), v1.movedim(0, -1)).movedim(-1, 0)
    else:
        out = _slerp_last_dim(t, v0, v1)
    return out if b is None else b + out


def fused(ops, base, models, *, out_dtype, weights, nuslerp_row_wise=False,
          nuslerp_flatten=True) -> torch.Tensor:
    """:func:`reference` from the kernels ``ops``: one Gram pass of the deltas per vector (the
    whole tensor, each last-dim row, or each dim-0 column), the two coefficients per vector on
    the host from ``cos = clamp(G01 / (max(n0, 1e-7) max(n1, 1e-7)), -1, 1)`` (float64; the
    collinear test ``1 - cos^2 <= 1e-16`` on cos rounded to fp32, as the reference's is, so
    that it decides alike), one pass writing ``base + c0 v0 + c1 v1``."""
    b, (m0, m1) = checked("nuslerp", CONTRACT, base, models)
    t, row_wise, flatten = _params(weights, nuslerp_row_wise, nuslerp_flatten)
    along = "all" if flatten else ("first" if row_wise and m0.dim() > 1 else "last")
    names = model_names(2)
    g = ops.gram([m0, m1], names, base=b, along=along)
    n0 = g[:, 0, 0].sqrt().clamp(min=NORM_EPS)
    n1 = g[:, 1, 1].sqrt().clamp(min=NORM_EPS)
    cos = (g[:, 0, 1] / (n0 * n1)).clamp(-1, 1)
    collinear = (1 - cos.float().double().square()) <= EPS ** 2
    theta = torch.acos(torch.where(collinear, 0, cos))
    c0 = torch.where(collinear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta))
    c1 = torch.where(collinear, t, torch.sin(t * theta) / torch.sin(theta))
    return ops.lincomb([m0, m1], names, torch.stack([c0, c1], dim=1), base=b, base_coef=1.0,
                       delta=True, along=along, out_dtype=out_dtype)
