"""Karcher mean: the Riemannian (Fréchet) mean of the inputs' directions on the unit sphere,
scaled by their mean norm (mergekit ``karcher``; https://arxiv.org/abs/2603.04972)."""
from __future__ import annotations

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import checked, inputs, model_names

# mergekit ignores the base flag: a base, when given, is one more input of the mean.
CONTRACT = dict(base="optional", min_models=0, max_models=None)
PARAMS = {"max_iter": 10, "tol": 1e-5}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x)


def _tangent(mean, units, alphas, tol):
    """``sum_k a_k theta_k / sin(theta_k) (u_k - cos_k mean)``, skipping ``theta_k < tol``."""
    tangent = torch.zeros_like(mean)
    for a, u in zip(alphas, units):
        cos = torch.dot(mean, u).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        if theta < tol:
            continue
        tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
    return tangent


def reference(base, models, *, max_iter=10, tol=1e-5) -> torch.Tensor:
    """Karcher mean of the N inputs ``x = [base, *models]`` (``models`` alone without a base),
    all with weight ``alpha = 1/N`` (mergekit's ``karcher``: every entry, equal weights).

    ``u_k = x_k / |x_k|`` (0 when ``|x_k| = 0``); only inputs with ``|x_k| > tol`` take part,
    with renormalized weights ``a_k``. Start at ``mean = normalize(sum a_k u_k)`` (the first
    valid ``u`` when that sum's norm ``< tol``), then up to ``max_iter`` times::

        tangent = sum_k a_k theta_k / sin(theta_k) (u_k - cos_k mean),
                  cos_k = clamp(mean . u_k, -1, 1), theta_k = acos(cos_k), terms with theta_k < tol skipped
        stop if |tangent| < tol
        mean = normalize(cos(|tangent|) mean + sin(|tangent|) tangent / |tangent|)  (if its norm > tol)

    Result: ``(sum_k alpha_k |x_k|) mean`` over all inputs. One input: itself; no valid input:
    zeros. ``max_iter <= 0`` keeps the starting mean; any finite ``tol`` is accepted.

    Differences from mergekit: none (mergekit rounds the units to the input dtype; here they
    stay fp32, as all of the compute does).
    """
    b, ms = inputs("karcher", CONTRACT, base, models)
    max_iter = V.integer(max_iter, "max_iter")
    tol = V.number(tol, "tol")
    xs = ([] if b is None else [b]) + ms
    if len(xs) == 1:
        return xs[0]
    shape = xs[0].shape
    xs = [x.reshape(-1) for x in xs]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [_norm(x) for x in xs]
    units = [torch.zeros_like(x) if n == 0 else x / n for x, n in zip(xs, norms)]
    valid = [k for k, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(shape)
    total = sum(alphas[k] for k in valid)
    a = [alphas[k] / total for k in valid]
    units = [units[k] for k in valid]
    mean = sum(ak * u for ak, u in zip(a, units))
    mean_norm = _norm(mean)
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = _tangent(mean, units, a, tol)
        tn = _norm(tangent)
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        unit_norm = _norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(ak * n for ak, n in zip(alphas, norms))
    return (scale * mean).reshape(shape)


# Eigen-directions of the Gram matrix below this fraction of its largest eigenvalue (components
# under 1e-6 of the largest, past what its double sums resolve on large tensors) are dropped.
RANK_EPS = 1e-12


def _coordinates(g: torch.Tensor):
    """``(Y, back)``: coordinates ``Y[:, k]`` of the inputs in an orthonormal basis of their
    span (``Y^T Y = G`` up to the dropped directions, ``G = Q diag(lam) Q^T``), and the map
    ``back`` (``Q lam^-1/2``) from a vector's coordinates to coefficients over the inputs."""
    lam, q = torch.linalg.eigh(g)
    keep = lam > RANK_EPS * float(lam.max().clamp(min=0))
    lam, q = lam[keep], q[:, keep]
    return lam.sqrt()[:, None] * q.t(), q / lam.sqrt()


def _span_mean(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """:func:`reference`'s iteration, literally, on the inputs' coordinates in their span (every
    vector it forms, units, mean and tangent, lies in it): float64 vectors of rank(G) entries.
    Returns the output ``(sum_k alpha_k |x_k|) mean`` as coefficients over the inputs. Working
    in coordinates, not on coefficient vectors, keeps exact cancellations exact (antipodal
    inputs: ``u_1 - cos mean = 0``) where ``c^T G c`` would leave rounding of the huge
    ``theta / sin(theta)`` terms."""
    N = g.shape[0]
    alphas = 1.0 / N
    norms = g.diagonal().clamp(min=0).sqrt()
    y, back = _coordinates(g)
    units = [torch.zeros_like(y[:, k]) if norms[k] == 0 else y[:, k] / y[:, k].norm()
             for k in range(N)]
    valid = [k for k in range(N) if norms[k] > tol]
    if not valid:
        return torch.zeros(N, dtype=torch.float64)
    a = [alphas / (alphas * len(valid))] * len(valid)
    units = [units[k] for k in valid]
    mean = sum(ak * u for ak, u in zip(a, units))
    mean_norm = mean.norm()
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = _tangent(mean, units, a, tol)
        tn = tangent.norm()
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        unit_norm = mean.norm()
        if unit_norm > tol:
            mean = mean / unit_norm
    return float(alphas * norms.sum()) * (back @ mean)


def fused(ops, base, models, *, out_dtype, max_iter=10, tol=1e-5) -> torch.Tensor:
    """:func:`reference` from the kernels ``ops``: the mean stays in the span of the inputs (it
    starts as a combination of the units ``x_k / |x_k|`` and each step adds a combination of
    units and mean), so one Gram pass ``G = [x_j . x_k]`` gives the inputs' coordinates in that
    span, the iteration runs on them (:func:`_span_mean`, mergekit's break conditions), and one
    pass writes ``sum_k c_k x_k``."""
    b, ms = checked("karcher", CONTRACT, base, models)
    max_iter = V.integer(max_iter, "max_iter")
    tol = V.number(tol, "tol")
    xs = ([] if b is None else [b]) + ms
    names = ([] if b is None else ["base"]) + model_names(len(ms))
    if len(xs) == 1:
        return ops.lincomb(xs, names, [1.0], out_dtype=out_dtype)
    coef = _span_mean(ops.gram(xs, names)[0], max_iter, tol)
    return ops.lincomb(xs, names, coef, out_dtype=out_dtype)
