"""Multi-SLERP: barycentric interpolation of K models on a hypersphere (mergekit ``multislerp``).

https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (Goddard 2025).
"""
from __future__ import annotations

import math

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import REQUIRED, checked, inputs, model_names

CONTRACT = dict(base="optional", min_models=1, max_models=None)
PARAMS = {"weights": REQUIRED, "normalize_weights": True, "eps": 1e-8}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)
ZERO_MEAN = ("models: the weighted mean of the unit vectors is zero (antipodal models whose "
             "weights cancel, or zero deltas); use other weights")


def _params(weights, k, normalize_weights, eps):
    """``(w, eps)``: the weights as a float32 tensor (divided by their sum when
    ``normalize_weights``), checked."""
    w = V.per_model(weights, k, "weights")
    normalize = V.flag(normalize_weights, "normalize_weights")
    eps = V.number(eps, "eps")
    w = torch.tensor(w, dtype=torch.float32)
    if normalize and k > 1:
        if float(w.sum()) == 0:
            raise ValueError("weights sum to zero: normalize_weights cannot divide by their sum")
        w = w / w.sum()
    return w, eps


def reference(base, models, *, weights, normalize_weights=True, eps=1e-8) -> torch.Tensor:
    """Weighted spherical mean of the vectors ``v_k = m_k - base`` (``v_k = m_k`` without a
    base), each the whole tensor flattened, with ``w = weights / sum(weights)`` when
    ``normalize_weights`` (else the weights as given)::

        u_k = v_k / (|v_k| + eps)
        mu  = sum_k w_k u_k ;  mean = mu / |mu|             (tangent point)
        g_k = u_k - (u_k . mean) mean ;  g = sum_k w_k g_k  (tangent-space mean)
        r   = |g| + eps
        out = base + (sum_k w_k |v_k|) (cos(r) mean + sin(r) / r g)

    Note ``g = mu - (mu . mean) mean = mu - |mu| mean = 0`` for any weights, so ``r = eps``
    and ``out = base + (sum_k w_k |v_k|) mu / |mu|`` up to rounding: K norms and the K(K+1)/2
    dot products ``u_j . u_k`` (one reduction pass) give the whole merge. The tangent steps
    are kept as mergekit computes them.

    One model: the model itself. ``|mu| < eps`` (antipodal inputs whose weights cancel, zero
    deltas, 0-size tensors): two models fall back to ``base + w_0 v_0 + w_1 v_1``; three or more
    raise ValueError, as in mergekit.

    Differences from mergekit: weights that sum to zero with ``normalize_weights`` raise
    ValueError naming ``weights`` (mergekit divides by zero and returns nan everywhere).
    """
    b, ms = inputs("multislerp", CONTRACT, base, models)
    w, eps = _params(weights, len(ms), normalize_weights, eps)
    if len(ms) == 1:
        return ms[0]
    vs = [m.reshape(-1) if b is None else (m - b).reshape(-1) for m in ms]
    norms = [torch.linalg.vector_norm(v) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mu = sum(wk * u for wk, u in zip(w, units))
    mu_norm = torch.linalg.vector_norm(mu)
    if mu_norm < eps:
        if len(ms) != 2:
            raise ValueError(ZERO_MEAN)
        out = vs[0] * w[0] + vs[1] * w[1]
    else:
        mean = mu / mu_norm
        g = sum(wk * (u - (u * mean).sum() * mean) for wk, u in zip(w, units))
        r = torch.linalg.vector_norm(g) + eps
        out = (torch.cos(r) * mean + g * (torch.sin(r) / r)) * sum(n * wk for n, wk in zip(norms, w))
    out = out.reshape(ms[0].shape)
    return out if b is None else out + b


def fused(ops, base, models, *, out_dtype, weights, normalize_weights=True,
          eps=1e-8) -> torch.Tensor:
    """:func:`reference` from the kernels ``ops``. With ``G`` the Gram matrix of the deltas (one
    pass), ``n_k = sqrt(G_kk)`` and ``a_k = w_k / (n_k + eps)``: ``mu = sum_k a_k v_k``, so
    ``|mu| = sqrt(a^T G a)``; the tangent ``g`` is zero (see :func:`reference`), ``r = eps``, and
    ``out = base + cos(r) (sum_k w_k n_k) / |mu| sum_k a_k v_k``: one pass writing the deltas'
    combination. (The reference's ``sin(r) / r g`` is its rounding noise; here it is 0.)"""
    b, ms = checked("multislerp", CONTRACT, base, models)
    w, eps = _params(weights, len(ms), normalize_weights, eps)
    names = model_names(len(ms))
    if len(ms) == 1:  # the model itself (the base read too: its inf/nan flag)
        return ops.lincomb(ms, names, [1.0], base=b, base_coef=0.0, out_dtype=out_dtype)
    w = w.double()
    g = ops.gram(ms, names, base=b)[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    a = w / (norms + eps)
    mu_norm = float((a @ g @ a).clamp(min=0).sqrt())
    if eps <= mu_norm and mu_norm ** 2 < 1e-4 * float((a * a * g.diagonal()).sum()):
        # a^T G a cancels (nearly antipodal deltas): |mu| is then rounding noise of the pass,
        # so, as the reference, normalize mu itself (one more pass, this case only)
        mu = ops.lincomb(ms, names, a, base=b, base_coef=0.0, delta=True, out_dtype=torch.float32)
        mu_norm = float(torch.linalg.vector_norm(mu))
        if mu_norm >= eps:
            out = mu * (math.cos(eps) * float((norms * w).sum()) / mu_norm)
            return (out if b is None else out + b.float()).to(out_dtype)
    if mu_norm < eps:
        if len(ms) != 2:
            raise ValueError(ZERO_MEAN)
        coef = w
    else:
        coef = math.cos(eps) * float((norms * w).sum()) / mu_norm * a
    return ops.lincomb(ms, names, coef, base=b, base_coef=1.0, delta=True, out_dtype=out_dtype)
