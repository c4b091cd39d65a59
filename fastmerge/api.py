"""Public merge API: ``fastmerge.merge(method, base, models, ...)`` and one alias per method.

Semantics follow mergekit 0.1.5's generalized task arithmetic (``backends/torch.py`` has the
formulas, ``_registry.py`` the per-method table); computation is fp32 throughout. A call is
validate -> plan -> run: :func:`_validate` checks and normalises the arguments, :func:`plan`
turns them into a :class:`~fastmerge._semantics.Plan`, and ``dispatch.run`` executes it on the
chosen backend.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from typing import Optional, Sequence

import torch

from . import _compile as C
from . import _registry as R
from . import _semantics as sem
from . import _validate as V
from . import dispatch as B
from . import formats, lowrank
from .philox import resolve_seed


def reference(method: str):
    """The function that defines ``method`` (its registry entry's ``reference``)."""
    module, _, name = R.get(method).reference.partition(":")
    return getattr(importlib.import_module(module), name)


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
    density=None,
    lam: float = 1.0,
    normalize: Optional[bool] = None,
    rescale=None,
    gamma=0.01,
    epsilon=None,
    seed: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
    alpha: Optional[float] = None,
    exact: bool = False,
    common_space_fraction: float = 0.8,
    threshold=None,
    quantize=None,
    **method_params,
):
    """Merge ``models`` onto ``base`` with one of mergekit's methods or an SVD method.

    ``out = base + lam * M(w_k * sparsify(models[k] - base))``, ``M`` a plain sum or TIES's
    sign-elected disjoint sum; ``normalize`` divides by ``sum w_k`` (of the agreeing models).

    Args:
        method: ``task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
            della, della_linear`` or ``linear`` (``sum w_k m_k / sum w_k``, base unused).
        base: the base model tensor (may be None for ``linear``).
        models: K same-shape, same-dtype, same-device tensors; read in place, never stacked.
        weights: scalar or K numbers (default 1.0 each), finite in float32 (as ``lam``).
        density: scalar or K numbers in [0, 1]: fraction of each delta kept (None: 1, or the method's).
        lam: mergekit's ``lambda``, scales the merged delta.
        normalize, rescale: None for the method's default. ``rescale`` True = mergekit's L1 norm
            matching; also ``"l1" | "l2" | "linf" | "density"`` (1/density).
        gamma: breadcrumbs' fraction of largest magnitudes removed (scalar or per model).
        epsilon: DELLA's spread of keep probabilities (scalar or per model; default 0.15), or
            RAM's magnitude threshold (default 1e-5).
        seed: Philox seed for DARE/DELLA; None draws one from torch's default generator.
        out_dtype: output dtype (default: base's dtype).
        backend: ``auto | torch | cpu | triton | cuda`` (default: ``FASTMERGE_BACKEND`` or auto).
            Only ``torch`` records autograd: ``auto`` sends calls with an input or ``weights``
            tensor that requires grad there; a fused backend warns once (no graph).
        quantize: None, ``"int4"`` / ``"fp8"`` or a :mod:`fastmerge.quant` config: the merged
            tensor quantized, exactly ``quant.quantize(merge(...), cfg)``; fused into one pass
            on ``cpu`` (INT4, per-row FP8) and ``triton`` (INT4), the merged tensor never written.

    SVD methods (FusionBench's math, :mod:`fastmerge.lowrank`): ``tsv`` (TSV-Merge),
    ``iso_c``, ``iso_cts``. ``out = base + alpha * tau`` where ``tau`` merges the task
    vectors ``weights[t] * (models[t] - base)``: 2-D tensors by SVD, other tensors by their
    mean. ``alpha`` is FusionBench's ``scaling_factor`` (default: ``lam``, i.e. 1.0; giving
    both is an error); ``weights`` scale the task vectors before the SVDs (FusionBench's
    list-valued TSV ``alpha``). ``exact=True`` runs every SVD with ``torch.linalg.svd`` as
    FusionBench does; the default sketches the top components (randomized SVD, ``seed``
    seeds the sketch). ``common_space_fraction`` is Iso-CTS's (FusionBench default 0.8).
    ``density``, ``gamma``, ``epsilon``, ``normalize`` and ``rescale`` do not apply to them.

    They run torch's GEMM/LAPACK kernels on the tensors' device whatever the backend.

    ``threshold`` (``ties``): scalar or K magnitudes; model k keeps ``|models[k] - base| >=
    threshold[k]`` instead of a ``density`` share (a whole-model threshold, FusionBench's TIES).

    mergekit's other methods (``slerp, nuslerp, multislerp, karcher, model_stock, sce, nearswap,
    arcee_fusion, ram, ramplus_tl, passthrough``) take their mergekit parameters as keyword
    arguments under mergekit's names (``t``, ``nuslerp_row_wise``, ``select_topk``, ``r``, ...;
    ``weights`` for mergekit's per-model ``weight``); each is defined, with its formula and
    paper, by ``reference`` in ``fastmerge/methods/<method>.py``, as are the research methods
    ``consensus_ta``, ``consensus_ties``, ``pcb`` and ``emr`` (its unified model).
    """
    every = dict(weights=weights, density=density, lam=lam, normalize=normalize, rescale=rescale,
                 gamma=gamma, epsilon=epsilon, threshold=threshold, seed=seed, out_dtype=out_dtype,
                 backend=backend, alpha=alpha, exact=exact, common_space_fraction=common_space_fraction)
    if C.compiling():
        if quantize is None:  # torch.compile: the opaque custom op (library.py)
            every.update(method_params)
            return torch.ops.fastmerge.merge(method, base, list(models),
                                             *[C.MERGE_ARGS[p][1](every.get(p)) for p in C.MERGE_PARAMS])
        warnings.warn("fastmerge.merge(quantize=...) is not a torch.library op (its result is not "
                      "a tensor): under torch.compile it runs eagerly, with a graph break",
                      RuntimeWarning, stacklevel=2)
    entry = R.get(method)
    if entry.family == "method":
        return _run_method(entry, base, models, dict(every, **method_params), quantize)
    extra = [k for k, v in method_params.items() if v is not None]
    if extra:
        raise TypeError(f"{method} takes no argument {extra[0]!r}")
    args = _validate(entry, base, models, weights, density, lam, out_dtype, quantize)
    if entry.family == "svd":
        return _run_svd(entry, base, args, alpha, exact, seed, common_space_fraction, backend)
    if alpha is not None:
        raise ValueError(f"alpha scales the SVD merges ({', '.join(R.names('svd'))}); "
                         f"method {method!r} takes lam")
    p = plan(entry, base, args["models"], args["w"], args["dens"], args["lam"], normalize=normalize,
             rescale=rescale, gamma=gamma, epsilon=entry.defaults.get("epsilon") if epsilon is None
             else epsilon, seed=seed, threshold=threshold)
    p.weight_grad = args["wgrad"]
    return B.run(p, base if entry.family == "gta" else None, args["models"], args["dtype"], backend,
                 method, args["qcfg"])


def merge_with_keep(method: str, base: torch.Tensor, models: Sequence[torch.Tensor], keep, *,
                    factors=None, weights=None, density=1.0, lam: float = 1.0,
                    normalize: Optional[bool] = None, rescale=None, epsilon=None,
                    out_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
    """:func:`merge` for a random method (``dare_ties, dare_linear, della, della_linear``) with
    its random keep masks drawn by the caller instead of fastmerge's Philox stream.

    ``keep``: one entry per model: a bool tensor of the models' shape (True = kept), or None
    where the method draws nothing for that model (its density keeps all, or with DELLA
    drops all). ``factors``: optional per-model norm-matching factors for ``rescale`` (as the
    caller's library computed them, so that its rounding is reproduced), None entries (or
    ``factors=None``) computed from the norms as :func:`merge` does. Everything else (the
    rescale, weights, sign election, disjoint sum, normalization) is :func:`merge`'s, fused.
    The integrations' ``patch(rng="torch")`` draws the masks with the library's own
    ``torch.bernoulli`` calls and passes them here."""
    entry = R.get(method)
    if entry.family != "gta" or entry.sparsify not in ("random", "della"):
        raise ValueError(f"keep masks replace the random masks of dare_ties, dare_linear, della and "
                         f"della_linear, not of method {method!r}")
    args = _validate(entry, base, models, weights, density, lam, out_dtype, None)
    K = len(args["models"])
    keep = V.keep_masks(keep, args["models"], "keep")
    factors = [None] * K if factors is None else list(factors)
    if len(factors) != K:
        raise ValueError(f"factors must have one entry per model ({K}), got {len(factors)}")
    p = plan(entry, base, args["models"], args["w"], args["dens"], args["lam"], normalize=normalize,
             rescale=rescale, epsilon=entry.defaults.get("epsilon") if epsilon is None else epsilon,
             seed=0)
    masks = []
    for k, (spec, mask, factor) in enumerate(zip(p.masks, keep, factors)):
        drawn = spec.kind in ("random", "della")
        if drawn != (mask is not None):
            raise ValueError(f"keep[{k}] must be {'a bool tensor' if drawn else 'None'}: model {k}'s "
                             f"density {args['dens'][k]} {'draws' if drawn else 'draws no'} random mask")
        masks.append(sem.given_mask(mask, args["dens"][k], None if factor is None else V.number(factor, f"factors[{k}]"))
                     if drawn else spec)
    p.masks = masks
    p.weight_grad = args["wgrad"]
    return B.run(p, base, args["models"], args["dtype"], backend, method)


def _run_svd(entry, base, args, alpha, exact, seed, common_space_fraction, backend):
    if alpha is not None and args["lam"] != 1.0:
        raise ValueError("give either alpha or lam for an SVD merge, not both (they are the same scale)")
    B.resolve(backend, args["ref"].device, entry.name)  # same backend errors as every other method
    merged = lowrank.merge(entry.name, base, args["models"], weights=args["w"],
                           alpha=args["lam"] if alpha is None else V.number(alpha, "alpha"),
                           exact=V.flag(exact, "exact"), seed=seed,
                           common_space_fraction=common_space_fraction, out_dtype=args["dtype"])
    qcfg = args["qcfg"]
    return merged if qcfg is None else B.quantize(merged, qcfg, None)


def _run_method(entry, base, models, given: dict, quantize):
    """A :mod:`fastmerge.methods` method: its parameters (mergekit's names; None or absent means
    the method's default), then the backend's kernel or the reference, cast to ``out_dtype``."""
    out_dtype, backend = given.pop("out_dtype"), given.pop("backend")
    given = {k: v for k, v in given.items() if v is not None and v != _merge_defaults().get(k)}
    unknown = [k for k in given if k not in entry.params]
    if unknown:
        raise TypeError(f"{entry.name} takes no argument {unknown[0]!r}; it takes "
                        f"{', '.join(p for p in entry.params)}")
    params = {}
    for name, default in entry.defaults.items():
        value = given.get(name)
        if value is None and default is R.REQUIRED:
            raise TypeError(f"{entry.name} requires {name}=")
        params[name] = default if value is None else value
    if base is not None and not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor or None, got {type(base).__name__}")
    ref = base if base is not None else V.tensor_list(models)[0]
    dtype = V.out_dtype(out_dtype, ref.dtype)
    qcfg = formats.config(quantize)
    merged = B.run_method(entry.name, base, models, params, dtype, backend)
    return merged if qcfg is None else B.quantize(merged, qcfg, None)


@functools.lru_cache(maxsize=None)
def _merge_defaults() -> dict:
    """merge()'s keyword defaults, read off its signature: a method that does not take one of
    these arguments refuses it only when it is given another value."""
    return {k: p.default for k, p in inspect.signature(merge).parameters.items()
            if p.default is not inspect.Parameter.empty and p.default is not None}


def _validate(entry, base, models, weights, density, lam, out_dtype, quantize) -> dict:
    """Checks shared by every method; returns the normalised arguments."""
    models = V.tensor_list(models)
    if base is None and entry.base == "required":
        raise TypeError(f"base must be a torch.Tensor for method {entry.name!r}, got None")
    if base is not None and not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor, got {type(base).__name__}")
    ref, ref_name = (base, "base") if base is not None else (models[0], "models[0]")
    V.check_dtype(ref, ref_name)
    V.same_as(ref, ref_name, models, "models")
    K = len(models)
    qcfg = formats.config(quantize)
    if qcfg is not None:
        formats.check_shape(tuple(ref.shape), qcfg, ref_name)
    w = V.per_model(1.0 if weights is None else weights, K, "weights")
    return dict(models=models, ref=ref, w=w, wgrad=V.grad_weights(weights, K),
                dens=V.per_model(1.0 if density is None else density, K, "density", 0.0, 1.0), lam=V.number(lam, "lam"),
                dtype=V.out_dtype(out_dtype, ref.dtype), qcfg=qcfg)


def plan(entry, base, models, w, dens, lam, *, normalize=None, rescale=None, gamma=0.01, epsilon=0.15,
         seed=None, threshold=None) -> sem.Plan:
    """The :class:`~fastmerge._semantics.Plan` of a ``gta`` or ``linear`` method on validated
    arguments: one mask per model and the merge's settings."""
    K = len(models)
    if entry.family == "linear":
        norm = _flag(normalize, "normalize", entry.normalize)
        p = sem.Plan(masks=[sem.MaskSpec("none")] * K, weights=w, divisor="sumw_exact",
                     normalize=norm, lam=lam)
        # the divisor as the kernels form it (fp32, model order): weights whose float64 sum is
        # not 0 can still cancel there (1e8 - 99999999 is 0 in fp32)
        if norm and sem.weight_sum_divisor(p) == 0:
            raise ValueError(f"weights {w} sum to zero in float32 (the divisor of the merge): linear "
                             "merge cannot normalize (pass normalize=False)")
        return p
    masks = _masks(entry, base, models, dens, gamma, epsilon, threshold)
    random = any(m.kind in ("random", "della") for m in masks)
    return sem.Plan(
        masks=masks,
        weights=w,
        rescale=sem.rescale_mode(rescale, entry.rescale) if entry.sparsify else None,
        consensus=entry.consensus,
        elect_weighted=True,
        divisor="weight" if entry.consensus else "sumw",
        normalize=_flag(normalize, "normalize", entry.normalize),
        lam=lam,
        seed=resolve_seed(seed) if random or seed is not None else 0,  # validate a given seed
    )


def _masks(entry, base, models, dens, gamma, epsilon, threshold) -> list:
    """One :class:`~fastmerge._semantics.MaskSpec` per model, as the method sparsifies."""
    K, n, sparsify = len(models), base.numel(), entry.sparsify
    if threshold is not None:
        if sparsify != "magnitude":
            raise ValueError(f"threshold applies to magnitude trimming (ties), not to method {entry.name!r}")
        if any(d != 1.0 for d in dens):
            raise ValueError("give either density or threshold, not both")
        return _threshold_masks(base, models, V.per_model(threshold, K, "threshold", 0.0))
    if sparsify == "magnitude":
        return [sem.magnitude_mask(d, n) for d in dens]
    if sparsify == "outliers":
        g = V.per_model(gamma, K, "gamma", 0.0, 1.0)
        return [sem.outlier_mask(d, gi, n) for d, gi in zip(dens, g)]
    if sparsify == "random":
        return [sem.random_mask(d) for d in dens]
    if sparsify == "della":
        eps = V.per_model(epsilon, K, "epsilon", 0.0, 1.0)
        return [sem.della_mask(d, e) for d, e in zip(dens, eps)]
    return [sem.MaskSpec("none")] * K


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


# fastmerge.<method>: one alias per registry entry
globals().update({name: _alias(name) for name in R.METHODS})
