"""RegMean: merge linear layers by the closed-form least squares over the models' inputs.

Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023 (arXiv:2212.09849). For a linear layer ``y = W x`` fine-tuned into K models
``W_k`` and the Gram matrices of each model's layer inputs ``G_k = X_k^T X_k``, the merged weight
minimizes ``sum_k ||X_k W^T - X_k W_k^T||^2``:

    G_k' = alpha * G_k + (1 - alpha) * diag(G_k)      (off-diagonal entries times alpha)
    W^T  = (sum_k G_k')^{-1}  sum_k G_k' W_k^T

``alpha`` is the paper's α and FusionBench's ``reduce_non_diagonal_ratio``
(``fusion_bench.method.regmean.regmean.merging_with_regmean_weights``); ``alpha = 0`` keeps only
the diagonals (a per-input-feature weighted average), ``alpha = 1`` is the exact least squares.
A per-model importance ``c_k`` is a scaling of that model's Gram (``c_k G_k``: the objective's
k-th term times ``c_k``), so it has no parameter of its own; FusionBench has none either (its
Grams are already averaged over each model's examples).

Precision: Grams and weights are upcast once; the K products, the sums and the solve run in
fp32 (``compute_dtype=torch.float64`` for all three in fp64; fp64 inputs compute in fp64).
Solving the fp32 sums in fp64 alone buys little: the rounding of the fp32 right-hand side is
amplified by the same condition number (measured on 256-wide Grams of condition 5e3: 2.1e-5
relative error for an fp64 solve of fp32 sums, 2.7e-5 for the fp32 solve, 4.5e-5 for
FusionBench's fp32 ``torch.inverse``; 2.5e-8 -- the output's rounding -- in fp64 throughout).

The solve is an LU factorization with partial pivoting and two triangular solves (what
``torch.linalg.solve`` does; the factor is kept to check its pivots) of the summed Gram after a
symmetric diagonal scaling ``D^-1/2 (sum G') D^-1/2`` (``D`` its diagonal), so that a feature
with tiny activations is not mistaken for a singular direction. The result differs from
FusionBench's ``torch.inverse(sum G') @ (sum G' W^T)`` by round-off only (and is not less
accurate). A singular sum -- a feature no input ever activates, or fewer independent inputs
than features at ``alpha = 1`` -- raises :class:`SingularGramError` instead of returning inf,
nan or noise: the estimated reciprocal condition (smallest over largest LU pivot of the scaled
matrix) must be at least ``rcond`` (default ``in * eps``, eps of float32, or of float64 for
fp64 Grams: the precision the Grams were computed in; an fp32 Gram of rank ``in - 1`` measures
~1e-5 at ``in = 1024``, a full-rank one of condition 4e4 3e-3). For PSD Grams any ``alpha < 1``
makes the scaled sum's eigenvalues at least ``1 - alpha``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence

import torch

from . import _validate as V

__all__ = ["regmean", "regmean_state_dicts", "SingularGramError"]

DTYPES = V.SUPPORTED_DTYPES + (torch.float64,)
COMPUTE_DTYPES = (torch.float32, torch.float64)


class SingularGramError(ValueError):
    """The summed Gram of a RegMean merge is singular (to the precision of its inputs)."""


def regmean(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], *, alpha: float = 1.0,
            weight_transpose: bool = True, compute_dtype: Optional[torch.dtype] = None,
            rcond: Optional[float] = None) -> torch.Tensor:
    """RegMean merge of one linear layer: ``W = ((sum_k G_k')^{-1} sum_k G_k' W_k^T)^T``.

    Args:
        weights: K weights ``[out, in]`` (``torch.nn.Linear`` layout), one dtype and shape.
            With ``weight_transpose=False`` they are ``[in, out]`` (e.g. GPT-2's ``Conv1D``)
            and so is the result, as in FusionBench.
        grams: K input Gram matrices ``[in, in]`` (``X_k^T X_k``, any normalization), one dtype.
        alpha: off-diagonal entries of every Gram are multiplied by ``alpha``, the diagonal is
            kept (FusionBench's ``reduce_non_diagonal_ratio``; the default 1.0 is its function's,
            its shipped ``method/regmean/regmean.yaml`` sets 0.1). The paper uses ``[0, 1]``;
            like FusionBench any finite value is accepted (outside ``[0, 1]`` a PSD sum may
            become indefinite or singular, which the ``rcond`` check reports).
        compute_dtype: ``torch.float32`` (default, fp64 for fp64 inputs) or ``torch.float64``.
        rcond: smallest accepted reciprocal-condition estimate of the scaled summed Gram
            (default ``in * eps``, see the module docstring); ``0`` accepts every matrix LU can
            factor without a zero pivot.

    Returns the merged weight in the weights' dtype and layout, contiguous, on their device.
    Raises ``TypeError``/``ValueError`` naming the argument for bad input,
    :class:`fastmerge.NonFiniteError` for inf/nan inputs and :class:`SingularGramError`.
    """
    weights = V.tensor_list(weights, "weights")
    grams = V.tensor_list(grams, "grams")
    names = ([f"weights[{i}]" for i in range(len(weights))], [f"grams[{i}]" for i in range(len(grams))])
    return _regmean(weights, grams, _options(alpha, weight_transpose, compute_dtype, rcond), *names)


def regmean_state_dicts(state_dicts: Sequence[Mapping], grams_per_model: Sequence[Mapping], *,
                        alpha: float = 1.0, weight_transpose: bool = True,
                        compute_dtype: Optional[torch.dtype] = None,
                        rcond: Optional[float] = None) -> dict:
    """RegMean over whole models, as FusionBench's ``merging_with_regmean_weights``.

    ``state_dicts``: K state dicts with the same keys. ``grams_per_model``: K dicts
    ``{module name: Gram}`` with the same keys. A key ``<module>.weight`` whose ``<module>`` has
    a Gram is merged by :func:`regmean` (same keyword arguments); every other tensor is the
    mean of the K models' (fp32, fp64 for fp64; integer tensors must be equal in all models and
    are passed through). Unlike FusionBench, a Gram whose ``<module>.weight`` is not in the
    state dicts is an error (FusionBench ignores it, so a misnamed key silently averages).
    Returns a new dict in ``state_dicts[0]``'s key order.
    """
    opts = _options(alpha, weight_transpose, compute_dtype, rcond)
    sds = _mapping_list(state_dicts, "state_dicts")
    grs = _mapping_list(grams_per_model, "grams_per_model")
    if len(grs) != len(sds):
        raise ValueError(f"grams_per_model has {len(grs)} entries for {len(sds)} state_dicts: "
                         "one dict of Grams per model")
    _same_keys(sds, "state_dicts")
    _same_keys(grs, "grams_per_model")
    for module in grs[0]:
        if f"{module}.weight" not in sds[0]:
            raise ValueError(f"grams_per_model[0] has a Gram for {module!r} but state_dicts have no "
                             f"{module + '.weight'!r}")
    merged = {}
    for key in sds[0]:
        tensors = [sd[key] for sd in sds]
        names = [f"state_dicts[{i}][{key!r}]" for i in range(len(sds))]
        for t, name in zip(tensors, names):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module is not None and module in grs[0]:
            grams = [g[module] for g in grs]
            gnames = [f"grams_per_model[{i}][{module!r}]" for i in range(len(grs))]
            for g, name in zip(grams, gnames):
                if not isinstance(g, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(g).__name__}")
            merged[key] = _regmean(tensors, grams, opts, names, gnames)
        else:
            merged[key] = _average(tensors, names)
    return merged


# ----------------------------------------------------------------------------- implementation


def _options(alpha, weight_transpose, compute_dtype, rcond) -> tuple:
    alpha = V.number(alpha, "alpha")
    V.flag(weight_transpose, "weight_transpose")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be None, torch.float32 or torch.float64, got {compute_dtype!r}")
    if rcond is not None:
        rcond = V.number(rcond, "rcond")
        if rcond < 0:
            raise ValueError(f"rcond must be >= 0, got {rcond}")
    return alpha, weight_transpose, compute_dtype, rcond


def _check(weights, grams, transpose, wnames, gnames) -> int:
    """Validate the K (weight, Gram) pairs; return ``in``."""
    if len(grams) != len(weights):
        raise ValueError(f"grams has {len(grams)} entries for {len(weights)} weights: one Gram per model")
    w0, g0 = weights[0], grams[0]
    for w, name in zip(weights, wnames):
        V.check_dtype(w, name, DTYPES)
        if w.dim() != 2:
            raise ValueError(f"{name} must be a 2-D weight [out, in], got shape {tuple(w.shape)}")
        if w.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(w.shape)})")
    _same_as_named(w0, weights, wnames)
    n = w0.shape[1] if transpose else w0.shape[0]
    layout = "[out, in] (weight_transpose=True)" if transpose else "[in, out] (weight_transpose=False)"
    for g, name in zip(grams, gnames):
        V.check_dtype(g, name, DTYPES)
        if g.dim() != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"{name} must be a square Gram matrix [in, in], got shape {tuple(g.shape)}")
        if g.shape[0] != n:
            raise ValueError(f"{name} has shape {tuple(g.shape)} but the weights are {tuple(w0.shape)}, "
                             f"{layout}: the Gram must be [{n}, {n}]")
        if g.dtype != g0.dtype:
            raise TypeError(f"{name} has dtype {g.dtype} but {gnames[0]} has {g0.dtype}")
        if g.device != w0.device:
            raise ValueError(f"{name} is on {g.device} but {wnames[0]} is on {w0.device}; "
                             "move the tensors to one device")
    for t, name in zip(list(weights) + list(grams), list(wnames) + list(gnames)):
        V.check_finite(t, name)
    return n


def _same_as_named(ref, tensors, names) -> None:
    """Every tensor matches ``ref`` (``tensors[0]``) in shape, dtype and device; errors use
    each tensor's own name (``weights[i]``, or a state-dict key)."""
    for t, name in zip(tensors[1:], names[1:]):
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {names[0]} has {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {names[0]} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {ref.device}; "
                             "move the tensors to one device")


@torch.no_grad()
def _regmean(weights, grams, opts, wnames, gnames) -> torch.Tensor:
    alpha, transpose, compute_dtype, rcond = opts
    n = _check(weights, grams, transpose, wnames, gnames)
    cd = compute_dtype or (torch.float64 if torch.float64 in (weights[0].dtype, grams[0].dtype)
                           else torch.float32)
    if rcond is None:
        rcond = n * torch.finfo(torch.float64 if grams[0].dtype == torch.float64 else torch.float32).eps
    lhs = rhs = None
    for w, g in zip(weights, grams):
        g = g.to(cd)
        reduced = g * alpha  # a new tensor: the caller's Gram is never written
        reduced.diagonal().copy_(g.diagonal())
        prod = reduced @ (w.to(cd).mT if transpose else w.to(cd))  # [in, out]
        lhs = reduced if lhs is None else lhs.add_(reduced)
        rhs = prod if rhs is None else rhs.add_(prod)
    x = _solve(lhs, rhs, rcond, gnames, alpha)
    if not V.all_finite(x):  # every input is finite and the pivots passed: an fp32 overflow
        raise V.NonFiniteError(V.MERGED, overflow=True)
    return (x.mT if transpose else x).to(weights[0].dtype).contiguous()


def _solve(lhs, rhs, rcond, gnames, alpha) -> torch.Tensor:
    """``lhs^{-1} rhs`` through the LU factor of the diagonally scaled ``lhs`` (both are
    overwritten); :class:`SingularGramError` when a pivot is zero or their ratio is below
    ``rcond``."""
    d = lhs.diagonal().abs()
    s = torch.where(d > 0, d.rsqrt(), torch.ones_like(d))  # zero diagonal (non-PSD input): unscaled
    lhs.mul_(s[:, None]).mul_(s[None, :])
    lu, pivots, info = torch.linalg.lu_factor_ex(lhs)
    p = lu.diagonal().abs()
    est = float(p.min() / p.max()) if float(p.max()) > 0 else 0.0
    if int(info) != 0 or not est >= rcond:
        name = gnames[0].replace("[0]", "[k]", 1)
        head = f"the sum over k of {name} (alpha = {alpha:g}) is singular"
        dead = (d == 0).nonzero().flatten().tolist()
        if dead:
            raise SingularGramError(
                f"{head}: input feature(s) {dead[:8]} have a zero diagonal in every model's Gram "
                "(no input ever activates them), so no alpha fixes it; drop those input features "
                "or add a ridge (eps * I) to the Grams")
        raise SingularGramError(
            f"{head} to working precision (estimated reciprocal condition {est:.3g} < rcond = "
            f"{rcond:.3g}): these Grams do not determine the merge. Use alpha < 1 (FusionBench's "
            "reduce_non_diagonal_ratio; keeping the diagonals makes a sum of PSD Grams "
            "nonsingular), Grams from more examples, or rcond=0 to solve anyway")
    return torch.linalg.lu_solve(lu, pivots, rhs.mul_(s[:, None])).mul_(s[:, None])


def _mapping_list(x, name) -> list:
    if isinstance(x, Mapping) or isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a list of dicts (one per model), got a single {type(x).__name__}")
    try:
        x = list(x)
    except TypeError:
        raise TypeError(f"{name} must be a list of dicts (one per model), got {type(x).__name__}") from None
    if not x:
        raise ValueError(f"{name} is empty: at least one model is needed")
    for i, m in enumerate(x):
        if not isinstance(m, Mapping):
            raise TypeError(f"{name}[{i}] must be a dict (Mapping), got {type(m).__name__}")
    return x


def _same_keys(dicts, name) -> None:
    keys = set(dicts[0])
    for i, d in enumerate(dicts[1:], 1):
        if set(d) != keys:
            missing, extra = sorted(map(str, keys - set(d))), sorted(map(str, set(d) - keys))
            raise ValueError(f"{name}[{i}] has other keys than {name}[0]: missing {missing[:5]}, "
                             f"extra {extra[:5]}")


@torch.no_grad()
def _average(tensors, names) -> torch.Tensor:
    _same_as_named(tensors[0], tensors, names)
    t0 = tensors[0]
    if not (t0.is_floating_point() or t0.is_complex()):
        for t, name in zip(tensors[1:], names[1:]):
            if not torch.equal(t, t0):
                raise ValueError(f"{name} differs from {names[0]}: integer tensors cannot be averaged")
        return t0.clone()
    V.check_dtype(t0, names[0], DTYPES)
    for t, name in zip(tensors, names):
        V.check_finite(t, name)
    cd = torch.float64 if t0.dtype == torch.float64 else torch.float32
    acc = t0.to(cd, copy=True)
    for t in tensors[1:]:
        acc.add_(t.to(cd))
    return acc.div_(len(tensors)).to(t0.dtype)
