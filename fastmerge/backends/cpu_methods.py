"""The ``cpu`` backend's kernels for the :mod:`fastmerge.methods` methods' ``fused`` plans
(C++ in ``csrc/``, one file per kernel). Each function takes the validated inputs read in place
and returns a small host result or the merged tensor in ``out_dtype``.

* :func:`gram` (``csrc/gram.cpp``): one pass, the K x K matrix of the inputs' dot products (of
  their deltas from ``base`` when given), per vector, in float64.
* :func:`lincomb` (``csrc/lincomb.cpp``): one pass, ``sum_k c_k x_k + c_b base`` (or of the
  deltas), fp32 math, rounded once to ``out_dtype``.

A vector is the whole tensor (``along="all"``), each vector along the last dimension
(``"last"``: the rows of a matrix; a 0-d tensor is one element) or each vector along
dimension 0 (``"first"``: the columns of a matrix). Inputs that are not contiguous are made
contiguous once here. Both kernels flag inf/nan per input in the same pass; the first flagged
input (the base first, then the others in order) raises ``NonFiniteError`` naming it.

Every function here that returns a merged tensor has checked it (``RESULT_CHECKED``): the
kernel flags an inf/nan result in the pass that writes it, so no pass over the output follows
(``V.check_result``'s ``aminmax``); only an fp16/bf16 output, whose rounding can overflow past
the fp32 value the kernel saw, is scanned here. Inputs are named first: a non-finite result
from finite inputs raises ``NonFiniteError`` saying the merge overflowed.
"""
from __future__ import annotations

import math

import torch

from .. import _validate as V
from .. import abi
from . import _host, _native

ALONG = ("all", "last", "first")


def layout(shape, along: str = "all") -> tuple:
    """``(outer, length, inner)`` of the kernels (csrc/gram.h): ``outer * inner`` vectors of
    ``length`` elements, vector ``o * inner + i`` at flat indices ``(o * length + l) * inner + i``."""
    if along not in ALONG:
        raise ValueError(f"along must be one of {ALONG}, got {along!r}")
    shape = tuple(shape)
    if along == "all" or not shape:
        return 1, math.prod(shape), 1
    if along == "last":
        return math.prod(shape[:-1]), shape[-1], 1
    return 1, shape[0], math.prod(shape[1:])


def _prepare(xs, base):
    """Contiguous inputs (``contiguous()`` returns a contiguous tensor itself), their dtype code
    and the thread count, for every kernel below."""
    xs = [x.contiguous() for x in xs]
    base = None if base is None else base.contiguous()
    return xs, base, abi.dtype_code(xs[0].dtype), _native.threads(xs[0].numel())


RESULT_CHECKED = True


def _check_out(out: torch.Tensor, flag) -> None:
    """After the inputs' flags: ``flag`` (the kernel's: an fp32 result was inf/nan) raises the
    overflow error; an fp16/bf16 ``out`` is scanned (its rounding may overflow)."""
    if flag or (out.dtype != torch.float32 and not V.all_finite(out)):
        raise V.NonFiniteError(V.MERGED, overflow=True)


def _raise(flags, names, has_base: bool) -> None:
    """A kernel's K + 1 flags (inputs, then base) as ``NonFiniteError``, the base first (the
    order the references check in)."""
    K = len(flags) - 1
    order = ([K] if has_base else []) + list(range(K))
    _host.raise_nonfinite([flags[k] for k in order], [(names + ["base"])[k] for k in order])


def gram(xs, names, *, base=None, along: str = "all") -> torch.Tensor:
    """The float64 Gram matrices ``[nvec, K, K]`` of ``xs`` (of ``x_k - base`` when ``base`` is
    given): ``G[v, a, b] = <d_a, d_b>`` over vector ``v``. ``names`` name ``xs`` in errors."""
    xs, base, dt, threads = _prepare(xs, base)
    outer, length, inner = layout(xs[0].shape, along)
    K = len(xs)
    out = torch.empty((outer * inner, K, K), dtype=torch.float64)
    flags = _native.lib().gram(0 if base is None else base.data_ptr(), [x.data_ptr() for x in xs],
                               dt, outer, length, inner, out.data_ptr(), threads)
    _raise(flags, list(names), base is not None)
    return out


def lincomb(xs, names, coef, *, out_dtype, base=None, base_coef=None, delta: bool = False,
            along: str = "all") -> torch.Tensor:
    """``sum_k coef[v, k] x_k + base_coef[v] base`` per vector ``v`` (``x_k - base`` for ``x_k``
    when ``delta``), in fp32, as a new tensor of ``out_dtype``. ``coef``: K values per vector
    (``[nvec, K]``, or K values for all); ``base_coef``: one per vector or a scalar (required
    with ``base``)."""
    xs, base, dt, threads = _prepare(xs, base)
    outer, length, inner = layout(xs[0].shape, along)
    K, nvec = len(xs), outer * inner
    cf = torch.zeros((K + 1, nvec), dtype=torch.float32)
    cf[:K] = torch.as_tensor(coef, dtype=torch.float64).reshape(-1, K).expand(nvec, K).t()
    if base is not None:
        cf[K] = torch.as_tensor(base_coef, dtype=torch.float64).reshape(-1).expand(nvec)
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    flags = _native.lib().lincomb(0 if base is None else base.data_ptr(), [x.data_ptr() for x in xs],
                                  dt, out.data_ptr(), abi.dtype_code(out_dtype), outer, length, inner,
                                  cf.data_ptr(), bool(delta and base is not None), threads)
    _raise(flags[:K + 1], list(names), base is not None)
    _check_out(out, flags[K + 1])
    return out


# ---- elementwise merges (nearswap, ram, ramplus_tl, passthrough, sce) -----------------------
# csrc/nearswap.cpp, ram.cpp, passthrough.cpp (declared in csrc/elementwise.h). Each reads its
# inputs in place (a non-contiguous one is made contiguous first), computes in fp32, writes one
# tensor in out_dtype and returns a non-finite flag per input: models in order, then base
# (named as :func:`_raise` names them).


def _ew_prepare(base, models, out_dtype):
    """:func:`_prepare`'s inputs, the empty output, its element count and the native module."""
    models, base, _, _ = _prepare(models, base)
    ref = base if base is not None else models[0]
    out = ref.new_empty(ref.shape, dtype=out_dtype)
    return base, models, out, out.numel(), _native.lib()


def _ew_raise(flags, k: int, out=None) -> None:
    """The inputs' flags (models, then base), then with ``out`` the result's (:func:`_check_out`)."""
    _raise(flags[:k + 1], V.input_names(None, k), True)
    if out is not None:
        _check_out(out, flags[k + 1])


def nearswap(base, model, *, t: float, out_dtype):
    """mergekit's nearswap of ``model`` toward ``base`` (:mod:`fastmerge.methods.nearswap`)."""
    base, (model,), out, n, lib = _ew_prepare(base, [model], out_dtype)
    if n:
        _ew_raise(lib.nearswap(base.data_ptr(), model.data_ptr(), abi.dtype_code(base.dtype),
                               out.data_ptr(), abi.dtype_code(out_dtype), n, t, _native.threads(n)), 1, out)
    return out


def ram(base, models, *, epsilon: float, out_dtype, amplify=None):
    """RAM's merge (:mod:`fastmerge.methods.ram`), one pass; no models: base in ``out_dtype``.

    RAM+ (:mod:`fastmerge.methods.ramplus_tl`) passes ``amplify(shared, unique) -> lam``: a
    first pass counts, per model, the elements it changes that others change too (``shared``)
    and that it alone changes (``unique``), then the merge amplifies its unique deltas by
    ``lam[k]``."""
    if not models:
        return scaled_copy(base, scale=1.0, out_dtype=out_dtype, name="base")
    base, models, out, n, lib = _ew_prepare(base, models, out_dtype)
    K, ptrs, dt = len(models), [m.data_ptr() for m in models], abi.dtype_code(base.dtype)
    lam = []
    if amplify is not None:
        res = lib.ram_counts(base.data_ptr(), ptrs, dt, n, epsilon, _native.threads(n)) if n else [0] * (3 * K + 1)
        _ew_raise(res[2 * K:], K)
        lam = list(amplify(res[0:2 * K:2], res[1:2 * K:2]))
    if n:
        flags = lib.ram_merge(base.data_ptr(), ptrs, dt, out.data_ptr(), abi.dtype_code(out_dtype), n,
                              epsilon, lam, _native.threads(n))
        _ew_raise(flags, K, out)
    return out


def scaled_copy(x, *, scale: float, out_dtype, name: str = "models[0]"):
    """``scale * x`` in ``out_dtype`` (``scale`` 1: an exact copy); inf/nan raise naming ``name``."""
    _, (x,), out, n, lib = _ew_prepare(None, [x], out_dtype)
    if n:
        flags = lib.scaled_copy(x.data_ptr(), abi.dtype_code(x.dtype), out.data_ptr(),
                                abi.dtype_code(out_dtype), n, scale, _native.threads(n))
        _host.raise_nonfinite(flags[:1], [name])
        _check_out(out, flags[1])
    return out


# ---- merges after a selection over the whole tensor (sce, arcee_fusion) ----------------------
# csrc/sce.cpp, arcee_fusion.cpp (declared in csrc/selection.h): a reduction pass that also
# selects exactly (sce's top-k variances, arcee's quartiles), a few scalars on the host computed
# as the references compute them, then one merge pass.


def sce(base, models, *, select_topk: float, out_dtype):
    """SCE's merge (:mod:`fastmerge.methods.sce`); no models: the base in ``out_dtype``.

    The pass sums each model's energy ``sum d_k^2`` (of the kept elements when ``0 <
    select_topk < 1``, whose keep bits it writes); ``w`` follows from the energies as the
    reference computes it, in fp32; the merge pass applies it."""
    if not models:
        return scaled_copy(base, scale=1.0, out_dtype=out_dtype, name="base")
    base, models, out, n, lib = _ew_prepare(base, models, out_dtype)
    if n == 0:
        return out
    K, ptrs, dt, nt = len(models), [m.data_ptr() for m in models], abi.dtype_code(base.dtype), _native.threads(n)
    bits = torch.empty(0, dtype=torch.int64)
    if 0 < select_topk < 1:
        bits = torch.empty((n + 63) // 64, dtype=torch.int64)
        k, sums, flags = lib.sce_select(base.data_ptr(), ptrs, dt, n, select_topk, bits.data_ptr(), nt)
        mode = 1 if k else 2
    else:  # all kept, or (select_topk <= 0) none: the pass then only checks the inputs
        sums, flags = lib.sce_energy(base.data_ptr(), ptrs, dt, n, nt)
        mode = 0 if select_topk >= 1 else 2
    _ew_raise(flags, K)
    energy = torch.tensor([s / n if mode != 2 else 0.0 for s in sums], dtype=torch.float32)
    total = float(energy.sum())
    w = torch.full_like(energy, 1 / K) if abs(total) < 1e-6 else energy / total
    lib.sce_merge(base.data_ptr(), ptrs, dt, out.data_ptr(), abi.dtype_code(out_dtype), n, w.tolist(), mode,
                  bits.data_ptr(), nt)
    return out


def arcee_fusion(base, model, *, out_dtype):
    """Arcee Fusion's merge (:mod:`fastmerge.methods.arcee_fusion`): one pass for the rows' KL
    and the exact quartiles of the importance, the threshold in fp32 on the host, one merge."""
    base, (model,), out, n, lib = _ew_prepare(base, [model], out_dtype)
    if n == 0:
        return out
    length = base.shape[-1] if base.dim() else 1
    rows, dt, nt = n // length, abi.dtype_code(base.dtype), _native.threads(n)
    kl = torch.empty(rows, dtype=torch.float32)
    ranks = [int(q * (n - 1)) for q in (0.25, 0.5, 0.75)]
    values, flags = lib.arcee_select(base.data_ptr(), model.data_ptr(), dt, rows, length, ranks, kl.data_ptr(), nt)
    _ew_raise(flags, 1)
    q1, median, q3 = (torch.tensor(v, dtype=torch.float32) for v in values)
    thr = float(median + 1.5 * (q3 - q1))
    lib.arcee_merge(base.data_ptr(), model.data_ptr(), dt, out.data_ptr(), abi.dtype_code(out_dtype), rows, length,
                    kl.data_ptr(), thr, nt)
    return out


# ---- the research methods (consensus_ta, consensus_ties, fastmerge.research) ----------------
# csrc/consensus.cpp, emr.cpp, fisher.cpp (declared in csrc/research.h): one pass each after the
# exact top-k select of consensus_ties and the Fisher norms.


def _ties_cuts(base, models, top_k, n) -> list:
    """consensus_ties' per-model top sets ``(T, J)`` (key > T or key == T and index <= J) of
    ``|models[k] - base|`` for ``top_k[k]`` elements: one multi-query radix select."""
    cuts = [abi.NONE_T, -1] * len(models)
    queries = [k for k, c in enumerate(top_k) if 0 < c < n]
    for k, c in enumerate(top_k):
        if c >= n:
            cuts[2 * k] = -1  # every key > -1
    if queries:
        res = _native.lib().select_ranges(base.data_ptr(), [models[k].data_ptr() for k in queries],
                                          abi.dtype_code(base.dtype), n, list(range(len(queries))),
                                          [top_k[k] for k in queries], _native.threads(n))
        if res[-1]:  # a non-finite delta: the merge pass below names the input
            return None
        for q, k in enumerate(queries):
            cuts[2 * k], cuts[2 * k + 1] = res[2 * q], res[2 * q + 1]
    return cuts


def _consensus_run(base, models, *, lambdas, k, lam, out_dtype, mtl=None, top_k=None, normalize=False,
                   masks=False, thresholds=None):
    """The consensus pass: ``(out or None, packed masks or None)``."""
    base, models, out, n, lib = _ew_prepare(base, models, out_dtype or base.dtype)
    K = len(models)
    bits = torch.empty((K, (n + 7) // 8), dtype=torch.uint8) if masks else None  # the pass writes every byte
    if n == 0:
        return out, bits
    cuts = []
    if thresholds is not None:
        cuts = _host.threshold_cuts(thresholds)
    elif top_k is not None:
        cuts = _ties_cuts(base, models, top_k, n)
        if cuts is None:  # select_ranges saw inf/nan: find it (the pass flags every input)
            cuts = [-1, -1] * K
    mtl = None if mtl is None else mtl.contiguous()
    flags = lib.consensus(base.data_ptr(), [m.data_ptr() for m in models], abi.dtype_code(base.dtype),
                          0 if mtl is None else mtl.data_ptr(), abi.dtype_code(mtl.dtype) if mtl is not None else 0,
                          cuts, int(normalize), [float(x) for x in lambdas], int(min(k, 1 << 30)), lam,
                          out.data_ptr() if out_dtype is not None else 0, abi.dtype_code(out.dtype),
                          0 if bits is None else bits.data_ptr(), n, _native.threads(n))
    _ew_raise(flags[:K + 1], K)
    if flags[K + 1]:
        raise V.NonFiniteError("mtl")
    if out_dtype is not None:
        _check_out(out, flags[K + 2])
    return (out if out_dtype is not None else None), bits


def consensus(base, models, *, k, tall_lambda, lam, out_dtype, top_k=None, normalize=False, thresholds=None):
    """Consensus TA (``top_k`` None) or TIES (``top_k``: each model's top-k size; or
    ``thresholds``: keep ``|d| >= t``) merge, one pass after the select
    (:mod:`fastmerge.methods.consensus_ta`, ``consensus_ties``)."""
    return _consensus_run(base, models, lambdas=tall_lambda, k=k, lam=lam, out_dtype=out_dtype,
                          top_k=top_k, normalize=normalize, thresholds=thresholds)[0]


def tall_masks(base, models, lambdas, mtl=None):
    """The packed TALL masks ``uint8 [K, ceil(n / 8)]`` (:func:`fastmerge.research.tall_masks`)."""
    return _consensus_run(base, models, lambdas=lambdas, k=0, lam=1.0, out_dtype=None, mtl=mtl,
                          masks=True)[1]


def emr(base, models):
    """EMR's pass (:func:`fastmerge.research.emr`): ``(tau_uni fp32, packed masks, sum |tau_t|,
    sum |tau_uni m_t|)``."""
    base, models, _, n, lib = _ew_prepare(base, models, torch.float32)
    K = len(models)
    uni = torch.empty(base.shape, dtype=torch.float32)
    bits = torch.empty((K, (n + 7) // 8), dtype=torch.uint8)  # the pass writes every byte
    if n == 0:
        return uni, bits, [0.0] * K, [0.0] * K
    abs_sum, kept_sum, flags = lib.emr(base.data_ptr(), [m.data_ptr() for m in models],
                                       abi.dtype_code(base.dtype), uni.data_ptr(), bits.data_ptr(), n,
                                       _native.threads(n))
    _ew_raise(flags, K)
    return uni, bits, list(abs_sum), list(kept_sum)


def _fisher_raise(flags, names) -> None:
    """Fisher flags (1: inf/nan, 2: negative) named in input order."""
    _host.raise_nonfinite([f & 1 for f in flags], names)
    for f, name in zip(flags, names):
        if f & 2:
            raise ValueError(f"{name} has negative entries: a diagonal Fisher is >= 0")


def sum_squares(fishers, names) -> list:
    """``sum F_t^2`` per Fisher (float64); ``names``: the models' then the Fishers' names."""
    fishers = [f.contiguous() for f in fishers]
    n, K = fishers[0].numel(), len(fishers)
    if n == 0:
        return [0.0] * K
    sq, flags = _native.lib().fisher_sumsq([f.data_ptr() for f in fishers], abi.dtype_code(fishers[0].dtype), n,
                                           _native.threads(n))
    _fisher_raise(flags, names[K:])
    return list(sq)


def fisher(models, fishers, coef, eps, *, out_dtype, names):
    """Fisher's weighted mean (:func:`fastmerge.research.fisher`), one pass."""
    models = [m.contiguous() for m in models]
    fishers = [f.contiguous() for f in fishers]
    K, n = len(models), models[0].numel()
    out = torch.empty(models[0].shape, dtype=out_dtype)
    if n == 0:
        return out
    flags = _native.lib().fisher_merge([m.data_ptr() for m in models], abi.dtype_code(models[0].dtype),
                                       [f.data_ptr() for f in fishers], abi.dtype_code(fishers[0].dtype),
                                       [float(c) for c in coef], eps, out.data_ptr(), abi.dtype_code(out_dtype), n,
                                       _native.threads(n))
    _host.raise_nonfinite(flags[:K], names[:K])
    _fisher_raise(flags[K:2 * K], names[K:])
    _check_out(out, flags[2 * K])
    return out


def pcb(base, models, *, ranks, weights, lam, out_dtype, stats=None):
    """PCB's merge (:mod:`fastmerge.methods.pcb`, csrc/pcb.cpp): the clamp bounds of each
    ``|tau_t|`` by one multi-query radix select, the scores' order statistic and max by
    ``pcb_select``, then one merge pass; ``ranks = (lo, hi, q)`` as the reference indexes.
    ``stats = (lo, hi, q, M)`` given (taken over a whole model): the merge pass alone."""
    base, models, out, n, lib = _ew_prepare(base, models, out_dtype)
    if n == 0:
        return out
    K, ptrs, dt, nt = len(models), [m.data_ptr() for m in models], abi.dtype_code(base.dtype), _native.threads(n)
    if stats is None:
        stats = _pcb_stats(lib, base, models, ptrs, dt, n, ranks, nt)
    lo, hi, q, M = ([float(v) for v in x] for x in stats)
    flags = lib.pcb_merge(base.data_ptr(), ptrs, dt, out.data_ptr(), abi.dtype_code(out_dtype), n, lo, hi,
                          q, M, [float(w) for w in weights], lam, nt)
    _ew_raise(flags, K, out)
    return out


def _pcb_stats(lib, base, models, ptrs, dt, n, ranks, nt) -> tuple:
    """PCB's per-task ``(lo, hi, q, M)`` over the tensor: the clamp bounds by select_ranges, the
    score cut and max by pcb_select (which names a non-finite input)."""
    K = len(models)
    r_lo, r_hi, r_q = ranks
    # the r-th smallest |tau| is the (n - r)-th largest: the T of a top set of n - r elements
    # (for r = 0, the whole tensor, select_ranges reports no T: its minimum is taken here)
    qk = [n - r for r in (r_lo, r_hi) if r > 0]
    bounds = {}
    if qk:
        res = lib.select_ranges(base.data_ptr(), ptrs, dt, n, [k for k in range(K) for _ in qk], qk * K, nt)
        if res[-1]:
            _raise([int(not V.all_finite(m)) for m in models] + [int(not V.all_finite(base))],
                   V.input_names(None, K), True)
        for i, (k, r) in enumerate((k, r) for k in range(K) for r in (r_lo, r_hi) if r > 0):
            bounds[k, r] = _host.key_float(res[2 * i])
    for k in range(K):
        for r in (r_lo, r_hi):
            if r == 0 and (k, 0) not in bounds:
                d = (models[k].float() - base.float()).abs()
                V.check_finite(d, V.input_names(None, K)[k])
                bounds[k, 0] = float(d.min())
    lo = [bounds[k, r_lo] for k in range(K)]
    hi = [bounds[k, r_hi] for k in range(K)]
    q, M, flags = lib.pcb_select(base.data_ptr(), ptrs, dt, n, lo, hi, r_q, nt)
    _ew_raise(flags, K)
    return lo, hi, q, M
