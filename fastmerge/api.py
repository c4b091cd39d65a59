"""Public merge API: ``fastmerge.merge(method, base, models, ...)`` and one alias per method.

Semantics follow mergekit 0.1.5's generalized task arithmetic (see ``reference.py`` for the
formulas and ``_semantics.py`` for the per-method table); computation is fp32 throughout.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from . import _semantics as sem
from . import _validate as V
from . import dispatch as B
from . import library, lowrank
from . import quant as Q
from .philox import resolve_seed

ALL_METHODS = sem.METHODS + lowrank.METHODS


def run(plan: sem.Plan, base, inputs, out_dtype, backend, op: str = "merge",
        quantize: Optional["Q.QuantConfig"] = None):
    mod = B.for_op(backend, inputs[0].device, op)
    if quantize is None:
        return mod.run_plan(plan, base, inputs, out_dtype)
    if not hasattr(mod, "run_plan_quantized"):  # no fused merge->quantize here: one after the other
        return Q.quantize(mod.run_plan(plan, base, inputs, out_dtype), quantize)
    raw = mod.run_plan_quantized(plan, base, inputs, out_dtype, quantize)
    return Q._wrap(raw, quantize, tuple(inputs[0].shape), out_dtype)


def _rescale_mode(rescale, default: bool):
    if rescale is None:
        rescale = default
    if rescale is True:
        return "l1"
    if rescale is False:
        return None
    if isinstance(rescale, str) and rescale in sem.RESCALE_NORMS:
        return rescale
    raise ValueError(f"rescale must be a bool or one of {sem.RESCALE_NORMS}; got {rescale!r}")


def _flag(x, name: str, default: bool) -> bool:
    if x is None:
        return default
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool or None, got {type(x).__name__}")
    return x


def merge(
    method: str,
    base: Optional[torch.Tensor],
    models: Sequence[torch.Tensor],
    *,
    weights=None,
    density=1.0,
    lam: float = 1.0,
    normalize: Optional[bool] = None,
    rescale=None,
    gamma=0.01,
    epsilon=0.15,
    seed: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
    alpha: Optional[float] = None,
    exact: bool = False,
    common_space_fraction: float = 0.8,
    threshold=None,
    quantize=None,
):
    """Merge ``models`` onto ``base`` with one of mergekit's methods or an SVD method.

    ``out = base + lam * M(w_k * sparsify(models[k] - base))`` where ``M`` is a plain sum
    (task arithmetic, DARE linear, breadcrumbs, DELLA linear) or TIES's sign-elected disjoint
    sum; ``normalize`` divides by ``sum w_k`` (over the agreeing models under consensus).

    Args:
        method: ``task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
            della, della_linear`` or ``linear`` (``sum w_k m_k / sum w_k``, base unused).
        base: the base model tensor (may be None for ``linear``).
        models: K same-shape, same-dtype, same-device tensors; read in place, never stacked.
        weights: scalar or K numbers (default 1.0 each).
        density: scalar or K numbers in [0, 1]: fraction of each delta kept (1 = no pruning).
        lam: mergekit's ``lambda``, scales the merged delta.
        normalize, rescale: None for the method's default. ``rescale`` True = mergekit's L1 norm
            matching; also ``"l1" | "l2" | "linf" | "density"`` (1/density).
        gamma: breadcrumbs' fraction of largest magnitudes removed (scalar or per model).
        epsilon: DELLA's spread of keep probabilities (scalar or per model).
        seed: Philox seed for DARE/DELLA; None draws one from torch's default generator.
        out_dtype: output dtype (default: base's dtype).
        backend: ``auto | torch | cpu | triton | cuda`` (default: env ``FASTMERGE_BACKEND``
            or auto).
        quantize: None (return the merged tensor), or ``"int4"`` / ``"fp8"`` /
            :class:`fastmerge.quant.Int4Config` / :class:`fastmerge.quant.FP8Config`: return the
            merged tensor quantized (an Int4 dataclass, or ``(q, scale)`` for FP8), exactly
            ``fastmerge.quant.quantize(merge(...), cfg)`` with the merge rounded to
            ``out_dtype`` first. On ``cpu`` (INT4, per-row FP8) and ``triton`` (INT4) the merge
            and the quantizer run as one pass and the merged tensor is never written; otherwise
            (and for the SVD methods) the merge runs, then the quantizer.

    SVD methods (FusionBench's math, :mod:`fastmerge.lowrank`): ``tsv`` (TSV-Merge),
    ``iso_c``, ``iso_cts``. ``out = base + alpha * tau`` where ``tau`` merges the task
    vectors ``weights[t] * (models[t] - base)``: 2-D tensors by SVD, other tensors by their
    mean. ``alpha`` is FusionBench's ``scaling_factor`` (default: ``lam``, i.e. 1.0; giving
    both is an error); ``weights`` scale the task vectors before the SVDs (FusionBench's
    list-valued TSV ``alpha``). ``exact=True`` runs every SVD with ``torch.linalg.svd`` as
    FusionBench does; the default sketches the top components (randomized SVD, ``seed``
    seeds the sketch). ``common_space_fraction`` is Iso-CTS's (FusionBench default 0.8).
    ``density``, ``gamma``, ``epsilon``, ``normalize`` and ``rescale`` do not apply to them.

    ``threshold`` (magnitude-trimming methods: ``ties``): scalar or K magnitudes; model k keeps
    every element with ``|models[k] - base| >= threshold[k]`` instead of a ``density`` share of
    this tensor. This is how a threshold computed over a whole model (FusionBench's TIES, see
    ``fastmerge merge``'s ``topk_scope: model``) is applied tensor by tensor.
    They run torch's GEMM/LAPACK kernels on the tensors' device whatever the backend
    (``backend`` is still checked).
    """
    if library.compiling() and threshold is None and quantize is None:  # torch.compile: the opaque custom op (library.py)
        return torch.ops.fastmerge.merge(
            method, base, list(models), library.floats(weights), library.floats(density), float(lam),
            normalize, library.rescale_in(rescale), library.floats(gamma), library.floats(epsilon),
            library.seed_in(seed), out_dtype, backend, None if alpha is None else float(alpha), exact,
            float(common_space_fraction))
    if not isinstance(method, str) or method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    models = V.tensor_list(models)
    if base is None and method != "linear":
        raise TypeError(f"base must be a torch.Tensor for method {method!r}, got None")
    if base is not None and not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor, got {type(base).__name__}")
    ref, ref_name = (base, "base") if base is not None else (models[0], "models[0]")
    V.check_dtype(ref, ref_name)
    V.same_as(ref, ref_name, models, "models")
    K = len(models)
    w = V.per_model(1.0 if weights is None else weights, K, "weights")
    dens = V.per_model(density, K, "density", 0.0, 1.0)
    lam = V.number(lam, "lam")
    dtype = V.out_dtype(out_dtype, ref.dtype)
    qcfg = Q.config(quantize)
    if qcfg is not None:
        Q.check_shape(tuple(ref.shape), qcfg, ref_name)

    if method in lowrank.METHODS:
        if alpha is not None and lam != 1.0:
            raise ValueError("give either alpha or lam for an SVD merge, not both (they are the same scale)")
        B.resolve(backend, ref.device, method)  # same backend errors as every other method
        merged = lowrank.merge(method, base, models, weights=w,
                               alpha=lam if alpha is None else V.number(alpha, "alpha"),
                               exact=V.flag(exact, "exact"), seed=seed,
                               common_space_fraction=common_space_fraction, out_dtype=dtype)
        return merged if qcfg is None else Q.quantize(merged, qcfg)
    if alpha is not None:
        raise ValueError(f"alpha scales the SVD merges ({', '.join(lowrank.METHODS)}); "
                         f"method {method!r} takes lam")

    if method == "linear":
        norm = _flag(normalize, "normalize", True)
        if norm and sum(w) == 0:
            raise ValueError("weights sum to zero: linear merge cannot normalize (pass normalize=False)")
        plan = sem.Plan(masks=[sem.MaskSpec("none")] * K, weights=w, divisor="sumw_exact",
                        normalize=norm, lam=lam)
        return run(plan, None, models, dtype, backend, method, qcfg)

    consensus, sparsify, d_norm, d_rescale = sem.MERGEKIT_METHODS[method]
    n = ref.numel()
    if threshold is not None:
        if sparsify != "magnitude":
            raise ValueError(f"threshold applies to magnitude trimming (ties), not to method {method!r}")
        if any(d != 1.0 for d in dens):
            raise ValueError("give either density or threshold, not both")
        masks = _threshold_masks(base, models, V.per_model(threshold, K, "threshold", 0.0))
    elif sparsify == "magnitude":
        masks = [sem.magnitude_mask(d, n) for d in dens]
    elif sparsify == "outliers":
        g = V.per_model(gamma, K, "gamma", 0.0, 1.0)
        masks = [sem.outlier_mask(d, gi, n) for d, gi in zip(dens, g)]
    elif sparsify == "random":
        masks = [sem.random_mask(d) for d in dens]
    elif sparsify == "della":
        eps = V.per_model(epsilon, K, "epsilon", 0.0, 1.0)
        masks = [sem.della_mask(d, e) for d, e in zip(dens, eps)]
    else:
        masks = [sem.MaskSpec("none")] * K
    random = any(m.kind in ("random", "della") for m in masks)
    plan = sem.Plan(
        masks=masks,
        weights=w,
        rescale=_rescale_mode(rescale, d_rescale) if sparsify else None,
        consensus=consensus,
        elect_weighted=True,
        divisor="weight" if consensus else "sumw",
        normalize=_flag(normalize, "normalize", d_norm),
        lam=lam,
        seed=resolve_seed(seed) if random or seed is not None else 0,  # validate a given seed
    )
    return run(plan, base, models, dtype, backend, method, qcfg)


def _threshold_masks(base, models, thresholds) -> list:
    """Keep ``|m - base| >= thr`` as a top-count mask: every element at or above the threshold
    precedes every element below it in the priority order, so the first ``count`` positions
    are exactly those elements (the deltas are formed in fp32, as the kernels form them)."""
    b = base.float()
    counts = [int(((m.float() - b).abs_() >= thr).sum()) for m, thr in zip(models, thresholds)]
    return [sem.MaskSpec("range", 0, c) if c < b.numel() else sem.MaskSpec("none") for c in counts]


def _alias(method: str):
    @functools.wraps(merge)
    def f(base, models, **kwargs):
        return merge(method, base, models, **kwargs)

    f.__name__ = f.__qualname__ = method
    f.__doc__ = f"``fastmerge.merge({method!r}, base, models, ...)``; see :func:`merge`."
    return f


task_arithmetic = _alias("task_arithmetic")
ties = _alias("ties")
dare_ties = _alias("dare_ties")
dare_linear = _alias("dare_linear")
breadcrumbs = _alias("breadcrumbs")
breadcrumbs_ties = _alias("breadcrumbs_ties")
della = _alias("della")
della_linear = _alias("della_linear")
linear = _alias("linear")
tsv = _alias("tsv")
iso_c = _alias("iso_c")
iso_cts = _alias("iso_cts")
