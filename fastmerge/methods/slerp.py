"""SLERP: spherical linear interpolation between the base and one model (mergekit ``slerp``).

https://en.wikipedia.org/wiki/Slerp (Shoemake 1985, "Animating rotation with quaternion curves").
"""
from __future__ import annotations

import math

import torch

from fastmerge import _validate as V
from fastmerge.methods._common import REQUIRED, checked, f32, inputs

CONTRACT = dict(base="required", min_models=1, max_models=1)
PARAMS = {"t": REQUIRED}
KERNELS = ("cpu", "triton", "cuda")
RESULT_CHECKED = True  # fused returns a checked kernel's output (methods/__init__.py)

# mergekit's fixed constants (arguments of its slerp(), not merge parameters)
DOT_THRESHOLD = 0.9995  # |cos| above this: linear interpolation (collinear or antipodal)
EPS = 1e-8              # a norm at most this is not normalized (taken as 1)


def reference(base, models, *, t) -> torch.Tensor:
    """``slerp(t; v0 = base, v1 = models[0])`` over the whole tensor as one vector.

    With ``n0 = |v0|`` and ``n1 = |v1|`` (each replaced by 1 when ``<= EPS``) and
    ``cos = clamp(sum((v0 / n0) * (v1 / n1)), -1, 1)``, ``theta = acos(cos)``::

        |cos| > 0.9995:  (1 - t) v0 + t v1
        otherwise:       sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1

    ``t = 0`` gives the base, ``t = 1`` the model; any finite ``t`` is accepted (outside
    [0, 1] it extrapolates, as in mergekit). The vectors are normalized before their product so
    that the dot cannot overflow. A zero vector keeps norm 1, so its cosine is 0 and the
    spherical branch runs (``theta = pi/2``), as mergekit does; 0-size tensors interpolate
    linearly. mergekit keeps its batch's leading axis, which for one tensor is the whole tensor.
    The two coefficients are scalars (computed here in double from the fp32 ``cos``), so a
    kernel needs one reduction pass (two norms and a dot) and one elementwise pass.

    Differences from mergekit: none by design. mergekit sums the norm in chunks of 2^20
    elements, so ``|cos|`` exactly at the threshold may round to the other side.
    """
    v0, (v1,) = inputs("slerp", CONTRACT, base, models)
    t = V.number(t, "t")
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    n0, n1 = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    n0 = n0 if n0 > EPS else torch.ones_like(n0)
    n1 = n1 if n1 > EPS else torch.ones_like(n1)
    c0, c1 = _coefficients(t, float(((a / n0) * (b / n1)).sum().clamp(-1, 1)))
    return (c0 * a + c1 * b).reshape(v0.shape)


def _coefficients(t: float, cos: float, branch_cos=None):
    """``(c0, c1)`` of ``c0 v0 + c1 v1`` from the (clamped) cosine, in double; the branch is
    chosen on ``branch_cos`` (default ``cos``)."""
    if abs(cos if branch_cos is None else branch_cos) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def fused(ops, base, models, *, out_dtype, t) -> torch.Tensor:
    """:func:`reference` from the kernels ``ops``: one Gram pass ``[[|v0|^2, v0.v1], [., |v1|^2]]``,
    the two coefficients on the host from ``cos = clamp(v0.v1 / (n0 n1), -1, 1)`` in double
    (the threshold tested on cos rounded to fp32, as the reference's fp32 sum is), one pass
    writing ``c0 v0 + c1 v1``."""
    v0, (v1,) = checked("slerp", CONTRACT, base, models)
    t = V.number(t, "t")
    names = ["base", "models[0]"]
    g = ops.gram([v0, v1], names)[0].tolist()
    if v0.numel() == 0:
        c0, c1 = 1 - t, t
    else:
        n0, n1 = math.sqrt(g[0][0]), math.sqrt(g[1][1])
        n0, n1 = (n0 if n0 > EPS else 1.0), (n1 if n1 > EPS else 1.0)
        cos = min(1.0, max(-1.0, g[0][1] / (n0 * n1)))
        c0, c1 = _coefficients(t, cos, f32(cos))
    return ops.lincomb([v0, v1], names, [c0, c1], out_dtype=out_dtype)
