"""The ``triton`` backend's kernels for the :mod:`fastmerge.methods` methods' ``fused`` plans
(``triton_kernels/gram.py``, ``lincomb.py``, ``nearswap.py``, ``ram.py``, ``passthrough.py``,
``sce.py``, ``arcee_fusion.py``) and for the research methods of issue 24 (``consensus.py``:
consensus_ta/ties and :func:`fastmerge.research.tall_masks`; ``emr.py``: EMR's pass; ``fisher.py``:
Fisher's sums of squares and merge; ``pcb.py``: PCB's scores and merge), with the functions and
signatures of :mod:`fastmerge.backends.cpu_methods`. The ``cuda``
backend delegates these methods here (``fastmerge.backends.method_ops("cuda")``): the CUDA
extension has no kernels for them.

Inputs are the validated tensors on one CUDA device (or CPU tensors in Triton's interpreter),
read in place; a non-contiguous one is made contiguous once, as the cpu backend does. Every
kernel flags inf/nan per input in the pass that reads it; each result costs at most one
device->host read (the Gram with its flags, a merge's flags, RAM+'s counts with their flags),
and per-vector coefficients one host->device copy (none for a single vector: they are kernel
arguments).

Every function here that returns a merged tensor has checked it (``RESULT_CHECKED``, read by
dispatch where it supports skipping its own pass over the output): the kernels flag a value
that is inf/nan *as stored* (after the rounding to the output dtype) in the pass that writes
it. The inputs are named first; a non-finite result from finite inputs raises
``NonFiniteError`` saying the merge overflowed.

Results: the elementwise kernels and :func:`lincomb` give the cpu backend's bytes (same fp32
operations in the same order, no FMA contraction, IEEE divisions). :func:`gram` sums the same
exact float64 products in another order (see ``triton_kernels/gram.py``): it agrees with the
cpu backend to a few float64 ulps, and is returned on the host, where the methods' plans do
their small float64 math.

The research methods: :func:`consensus` (TIES cuts from ``magnitude_select``'s deferred select,
its missed-bracket flag read with the pass's flags), :func:`tall_masks`, :func:`emr`'s unified
vector and masks and :func:`fisher`'s merge give the reference's bytes; :func:`emr`'s and
:func:`sum_squares`' float64 sums add the same exact terms in another order (per-program
partials, then a device sum: float64 round-off); :func:`pcb`'s exp and tanh are
``csrc/fmath.h``'s polynomials, so it gives the cpu backend's bytes and the reference's result
to fp32 round-off. Its order statistics (the clamp bounds, the score cut and max) are not
fused on Triton yet: ``torch.kthvalue``/``amax`` on the device. Masks (TALL, EMR) are packed as
``numpy.packbits`` packs a flat bool array and stay on the inputs' device.
"""
from __future__ import annotations

import struct

import torch

from .. import _validate as V
from .. import abi
from .._transfer import to_device, to_host
from . import _host
from ._gpu import _device
from .cpu_methods import _fisher_raise, layout
from .triton import kernels


RESULT_CHECKED = True


def _contiguous(xs, base):
    return [x.contiguous() for x in xs], (None if base is None else base.contiguous())


def _raise(flags, names, has_base: bool) -> None:
    """K + 1 flags (inputs, then base) as ``NonFiniteError``, the base first (as cpu_methods)."""
    K = len(flags) - 1
    order = ([K] if has_base else []) + list(range(K))
    _host.raise_nonfinite([flags[k] for k in order], [(list(names) + ["base"])[k] for k in order])


def _check_out(flag) -> None:
    """After the inputs' flags: the kernel's result flag (a stored value is inf/nan)."""
    if flag:
        raise V.NonFiniteError(V.MERGED, overflow=True)


def _view(outer: int, length: int, inner: int):
    """``(nvec, nred, sv, sr)``: the kernels' 2-D view of the layout's vectors."""
    if inner == 1:
        return outer, length, length, 1
    if outer != 1:
        raise ValueError(f"vectors along dim 0 take outer == 1, got outer={outer}")
    return inner, length, 1, inner


def gram(xs, names, *, base=None, along: str = "all") -> torch.Tensor:
    """The float64 Gram matrices ``[nvec, K, K]`` (on the host) of ``xs`` (of ``x_k - base``
    when ``base`` is given), per vector as ``cpu_methods.gram``; ``names`` name ``xs`` in errors."""
    xs, base = _contiguous(xs, base)
    outer, length, inner = layout(xs[0].shape, along)
    nvec, nred, sv, sr = _view(outer, length, inner)
    K = len(xs)
    P = K * (K + 1) // 2
    with _device(xs[0].device):
        res = kernels().gram(base, xs, nvec=nvec, nred=nred, sv=sv, sr=sr)
    host = torch.tensor(to_host(res), dtype=res.dtype)  # the one device->host read: sums and flags
    _raise([int(f) for f in host[nvec * P:].tolist()], names, base is not None)
    a, b = torch.triu_indices(K, K)
    g = torch.empty((nvec, K, K), dtype=torch.float64)
    sums = host[:nvec * P].view(nvec, P)
    g[:, a, b] = sums
    g[:, b, a] = sums
    return g


def lincomb(xs, names, coef, *, out_dtype, base=None, base_coef=None, delta: bool = False,
            along: str = "all") -> torch.Tensor:
    """``sum_k coef[v, k] x_k + base_coef[v] base`` per vector ``v`` (``x_k - base`` for
    ``x_k`` when ``delta``), in fp32, as a new tensor of ``out_dtype`` on the inputs' device
    (arguments as ``cpu_methods.lincomb``)."""
    xs, base = _contiguous(xs, base)
    outer, length, inner = layout(xs[0].shape, along)
    K, nvec = len(xs), outer * inner
    dev = xs[0].device
    cf = torch.zeros((K + 1, nvec), dtype=torch.float32)
    cf[:K] = torch.as_tensor(coef, dtype=torch.float64).reshape(-1, K).expand(nvec, K).t()
    if base is not None:
        cf[K] = torch.as_tensor(base_coef, dtype=torch.float64).reshape(-1).expand(nvec)
    out = torch.empty(xs[0].shape, dtype=out_dtype, device=dev)
    kw = dict(outer=outer, length=length, inner=inner, delta=delta)
    if nvec == 1:  # the fp32-rounded coefficients as kernel arguments (exact as Python floats)
        kw.update(scalars=cf[:K, 0].tolist(), base_scalar=float(cf[K, 0]))
    elif nvec > 1:
        kw.update(coef=cf.to(dev))
    with _device(dev):
        flags = to_host(kernels().lincomb(base, xs, out, **kw))
    _raise(flags[:K + 1], names, base is not None)
    _check_out(flags[K + 1])
    return out


def _ew(base, models, out_dtype):
    models, base = _contiguous(models, base)
    ref = base if base is not None else models[0]
    return base, models, torch.empty(ref.shape, dtype=out_dtype, device=ref.device), ref.numel()


def _ew_raise(flags, k: int) -> None:
    """Models' and base's flags; a (k + 2)-th entry is the result's (:func:`_check_out`)."""
    _raise(flags[:k + 1], V.input_names(None, k), True)
    if len(flags) > k + 1:
        _check_out(flags[k + 1])


def nearswap(base, model, *, t: float, out_dtype):
    """mergekit's nearswap of ``model`` toward ``base`` (:mod:`fastmerge.methods.nearswap`)."""
    base, (model,), out, n = _ew(base, [model], out_dtype)
    if n:
        with _device(base.device):
            flags = kernels().nearswap(base, model, out, n=n, t=t)
        _ew_raise(to_host(flags), 1)
    return out


def ram(base, models, *, epsilon: float, out_dtype, amplify=None):
    """RAM's merge (:mod:`fastmerge.methods.ram`), one pass; with ``amplify(shared, unique) ->
    lam`` RAM+ (:mod:`fastmerge.methods.ramplus_tl`): a counting pass first (its counts and
    flags read in one transfer), then the merge. No models: base in ``out_dtype``."""
    if not models:
        return scaled_copy(base, scale=1.0, out_dtype=out_dtype, name="base")
    base, models, out, n = _ew(base, models, out_dtype)
    K = len(models)
    ks = kernels()
    lam = []
    with _device(base.device):
        if amplify is not None:
            res = to_host(ks.ram_counts(base, models, n=n, eps=epsilon))
            _ew_raise(res[2 * K:], K)
            lam = list(amplify(res[0:2 * K:2], res[1:2 * K:2]))
        if n:
            _ew_raise(to_host(ks.ram_merge(base, models, out, n=n, eps=epsilon, lam=lam)), K)
    return out


def scaled_copy(x, *, scale: float, out_dtype, name: str = "models[0]"):
    """``scale * x`` in ``out_dtype`` (``scale`` 1: an exact copy); inf/nan raise naming ``name``."""
    _, (x,), out, n = _ew(None, [x], out_dtype)
    if n:
        with _device(x.device):
            flags = kernels().scaled_copy(x, out, n=n, scale=scale)
        flags = to_host(flags)
        _host.raise_nonfinite(flags[:1], [name])
        _check_out(flags[1])
    return out


# ---- merges after a selection over the whole tensor (sce, arcee_fusion) ----------------------
# triton_kernels/sce.py, arcee_fusion.py; the functions and their arguments are cpu_methods'
# (issue17-sce-arcee).

SCE_ALL, SCE_BITS, SCE_NONE = 0, 1, 2


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _sce_threshold(ks, base, models, n: int, select_topk: float):
    """``(mode, var, thr)`` of ``0 < select_topk < 1``: the variances, and the exact top-k
    threshold ``(T, J)`` on the device (``k = int(nonzero * select_topk)`` in fp32, torch's)."""
    var, res = ks.sce_variance(base, models, n=n)
    res = to_host(res)  # the one read of this pass: nonzero count and flags
    _ew_raise(res[1:], len(models))
    k = int(_f32(_f32(float(res[0])) * _f32(select_topk)))
    if k == 0:
        return SCE_NONE, None, None
    if k >= n:  # every element: the top set key > 0 or (key == 0 and i <= n)
        return SCE_BITS, var, torch.tensor([0, n], dtype=torch.int64, device=var.device)
    tj = ks.select(None, [var], qm=[0], qk=[k], n=n, C=n, strides=[(n, 1)], base_strides=(n, 1),
                   strided=False)
    return SCE_BITS, var, tj[0]


def sce(base, models, *, select_topk: float, out_dtype):
    """SCE's merge (:mod:`fastmerge.methods.sce`), as ``cpu_methods.sce``; no models: the base in
    ``out_dtype``. ``0 < select_topk < 1``: a variance pass and the exact top-k first; then
    the energies (one read with their flags), ``w`` on the host in fp32 as the reference
    computes it, and the merge pass."""
    if not models:
        return scaled_copy(base, scale=1.0, out_dtype=out_dtype, name="base")
    base, models, out, n = _ew(base, models, out_dtype)
    if n == 0:
        return out
    K, ks = len(models), kernels()
    with _device(base.device):
        mode, var, thr = (SCE_ALL if select_topk >= 1 else SCE_NONE), None, None
        if 0 < select_topk < 1:
            mode, var, thr = _sce_threshold(ks, base, models, n, select_topk)
        res = to_host(ks.sce_energy(base, models, n=n, mode=mode, var=var, thr=thr))
        _ew_raise([int(f) for f in res[K:]], K)
        energy = torch.tensor([s / n if mode != SCE_NONE else 0.0 for s in res[:K]], dtype=torch.float32)
        total = float(energy.sum())
        w = torch.full_like(energy, 1 / K) if abs(total) < 1e-6 else energy / total
        flags = ks.sce_merge(base, models, out, n=n, w=w.tolist(), mode=mode, var=var, thr=thr)
        _ew_raise(to_host(flags), K)
    return out


def arcee_fusion(base, model, *, out_dtype):
    """Arcee Fusion's merge (:mod:`fastmerge.methods.arcee_fusion`), as ``cpu_methods.arcee_fusion``:
    one row pass for the rows' KL and the importance ``s``, its three order statistics by
    ``torch.kthvalue`` on the device (read once with the flags), the threshold in fp32 on the
    host as the reference computes it, one merge pass."""
    base, (model,), out, n = _ew(base, [model], out_dtype)
    if n == 0:
        return out
    length = base.shape[-1] if base.dim() else 1
    ks = kernels()
    with _device(base.device):
        s, flags = ks.arcee_importance(base, model, rows=n // length, length=length)
        ranks = [int(q * (n - 1)) for q in (0.25, 0.5, 0.75)]
        vals = torch.stack([torch.kthvalue(s, r + 1).values for r in ranks])
        res = to_host(torch.cat([flags.to(torch.float64), vals.to(torch.float64)]))
        _ew_raise([int(f) for f in res[:2]], 1)
        q1, median, q3 = (torch.tensor(v, dtype=torch.float32) for v in res[2:])
        thr = float(median + 1.5 * (q3 - q1))
        _ew_raise(to_host(ks.arcee_merge(base, model, s, out, n=n, thr=thr)), 1)
    return out


# ---- the research methods (consensus_ta, consensus_ties, pcb, fastmerge.research) ------------
# triton_kernels/consensus.py, emr.py, fisher.py, pcb.py; the functions and their arguments are
# cpu_methods' (issue 24). Masks come back bit-packed on the inputs' device.


def _ties_cuts(ks, base, models, top_k, n: int, exact: bool):
    """consensus_ties' top sets ``(T, J)`` of each ``|models[k] - base|`` (int64 device
    ``[K, 2]``) for ``top_k[k]`` elements, from magnitude_select (one multi-query select), and
    its missed-bracket flag (int32 device ``[1]``, or None): no host read unless ``exact``."""
    host, queries = [], []
    for k, c in enumerate(top_k):
        host += [-1, -1] if c >= n else [abi.NONE_T, -1]  # every key > -1; no key > 2**32
        if 0 < c < n:
            queries.append(k)
    dev = base.device
    cuts = to_device(host, torch.int64, dev).view(-1, 2)
    if not queries:
        return cuts, None
    args = dict(qm=queries, qk=[top_k[k] for k in queries], n=n, C=n, strides=[(n, 1)] * len(models),
                base_strides=(n, 1), strided=False)
    missed = None
    if exact:
        tj = ks.select(base, models, **args)
    else:
        tj, missed = ks.select_deferred(base, models, **args)
        missed = missed.amax().reshape(1)
    cuts[to_device(queries, torch.int64, dev)] = tj
    return cuts, missed


def _consensus_run(base, models, *, lambdas, k, lam, out_dtype, mtl=None, top_k=None, normalize=False,
                   masks=False, thresholds=None):
    """The consensus pass: ``(out or None, packed masks or None)``; one host read (the flags
    with the TIES select's missed-bracket flag; a missed bracket redoes it exactly)."""
    models, base = _contiguous(models, base)
    dev, n, K = base.device, base.numel(), len(models)
    out = torch.empty(base.shape, dtype=out_dtype, device=dev) if out_dtype is not None else None
    bits = torch.empty((K, (n + 7) // 8), dtype=torch.uint8, device=dev) if masks else None  # all written
    if n == 0:
        return out, bits
    mtl = None if mtl is None else mtl.contiguous()
    ks = kernels()
    with _device(dev):
        for exact in (False, True):
            if thresholds is not None:  # |d| >= t: every key > key(t) - 1 (cpu_methods.threshold_cuts)
                cuts, missed = to_device(_host.threshold_cuts(thresholds), torch.int64, dev).view(-1, 2), None
            else:
                cuts, missed = (None, None) if top_k is None else _ties_cuts(ks, base, models, top_k, n, exact)
            flags = ks.consensus(base, models, n=n, lambdas=lambdas, kmin=float(min(k, 1 << 30)), lam=lam,
                                 out=out, bits=bits, mtl=mtl, cuts=cuts, normalize=normalize)
            flags = to_host(torch.cat([flags, missed if missed is not None else torch.zeros_like(flags[:1])]))
            _raise(flags[:K + 1], V.input_names(None, K), True)
            if flags[K + 1]:
                raise V.NonFiniteError("mtl")
            if not flags[-1]:  # the cuts were exact: this pass stands
                break
    if out is not None:
        _check_out(flags[K + 2])
    return out, bits


def consensus(base, models, *, k, tall_lambda, lam, out_dtype, top_k=None, normalize=False, thresholds=None):
    """Consensus TA (``top_k`` None) or TIES (``top_k``: each model's top-k size; or
    ``thresholds``: keep ``|d| >= t``) merge, one pass after the select
    (:mod:`fastmerge.methods.consensus_ta`, ``consensus_ties``)."""
    return _consensus_run(base, models, lambdas=tall_lambda, k=k, lam=lam, out_dtype=out_dtype,
                          top_k=top_k, normalize=normalize, thresholds=thresholds)[0]


def tall_masks(base, models, lambdas, mtl=None):
    """The packed TALL masks ``uint8 [K, ceil(n / 8)]`` (:func:`fastmerge.research.tall_masks`)
    on the inputs' device."""
    return _consensus_run(base, models, lambdas=lambdas, k=0, lam=1.0, out_dtype=None, mtl=mtl,
                          masks=True)[1]


def emr(base, models):
    """EMR's pass (:func:`fastmerge.research.emr`): ``(tau_uni fp32, packed masks, sum |tau_t|,
    sum |tau_uni m_t|)``, the tensors on the inputs' device, the sums (float64, see
    ``triton_kernels/emr.py`` for their order) read with the flags in one transfer."""
    models, base = _contiguous(models, base)
    dev, n, K = base.device, base.numel(), len(models)
    uni = torch.empty(base.shape, dtype=torch.float32, device=dev)
    bits = torch.empty((K, (n + 7) // 8), dtype=torch.uint8, device=dev)  # every byte written
    if n == 0:
        return uni, bits, [0.0] * K, [0.0] * K
    with _device(dev):
        res = to_host(kernels().emr(base, models, uni, bits, n=n))
    _ew_raise([int(f) for f in res[2 * K:]], K)
    return uni, bits, res[:K], res[K:2 * K]


def _fisher_flags(res, K: int) -> list:
    """Per Fisher: 1 if inf/nan, 2 if negative (cpu_methods' codes) from the ``2 K`` kernel flags."""
    return [int(bool(res[k])) | (2 if res[K + k] else 0) for k in range(K)]


def sum_squares(fishers, names) -> list:
    """``sum F_t^2`` per Fisher (float64); ``names``: the models' then the Fishers' names."""
    fishers = [f.contiguous() for f in fishers]
    n, K = fishers[0].numel(), len(fishers)
    if n == 0:
        return [0.0] * K
    with _device(fishers[0].device):
        res = to_host(kernels().fisher_sumsq(fishers, n=n))
    _fisher_raise(_fisher_flags(res[K:], K), names[K:])
    return res[:K]


def fisher(models, fishers, coef, eps, *, out_dtype, names):
    """Fisher's weighted mean (:func:`fastmerge.research.fisher`), one pass."""
    models = [m.contiguous() for m in models]
    fishers = [f.contiguous() for f in fishers]
    K, n = len(models), models[0].numel()
    out = torch.empty(models[0].shape, dtype=out_dtype, device=models[0].device)
    if n == 0:
        return out
    with _device(models[0].device):
        flags = to_host(kernels().fisher_merge(models, fishers, out, n=n, coef=coef, eps=eps))
    _host.raise_nonfinite(flags[:K], names[:K])
    _fisher_raise(_fisher_flags(flags[K:3 * K], K), names[K:])
    _check_out(flags[3 * K])
    return out


def pcb(base, models, *, ranks, weights, lam, out_dtype):
    """PCB's merge (:mod:`fastmerge.methods.pcb`), as ``cpu_methods.pcb``; ``ranks = (lo, hi,
    q)`` as the reference indexes. Not fused on Triton yet: the clamp bounds are
    ``torch.kthvalue`` of each ``|tau_t|`` (an fp32 temporary of one tensor at a time), the
    score pass writes every score (``[K, n]`` fp32), and its order statistic and max are
    ``torch.kthvalue`` / ``amax`` on the device; then one merge pass. No host read but the
    merge's flags (the merge pass flags every input)."""
    base, models, out, n = _ew(base, models, out_dtype)
    if n == 0:
        return out
    K, ks = len(models), kernels()
    r_lo, r_hi, r_q = ranks
    with _device(base.device):
        flat = base.reshape(-1).float()
        bounds = []
        for m in models:
            a = (m.reshape(-1).float() - flat).abs()
            bounds += [torch.kthvalue(a, r_lo + 1).values, torch.kthvalue(a, r_hi + 1).values]
        del a
        lohi = torch.stack(bounds)
        scores = ks.pcb_scores(base, models, lohi, n=n)
        # + 0.0: a -0 score taken as +0, as the C++ order keys take it
        qm = torch.stack([torch.kthvalue(scores, r_q + 1, dim=1).values, scores.amax(dim=1)], dim=1) + 0.0
        del scores
        flags = to_host(ks.pcb_merge(base, models, out, lohi, qm, n=n, w=weights, lam=lam))
    _ew_raise(flags, K)
    return out
