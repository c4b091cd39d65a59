"""The GPU backends' driver: runs a merge :class:`~fastmerge._semantics.Plan` on a *kernel
set* (``fastmerge.triton_kernels`` or the CUDA extension wrapped by ``fastmerge.backends.cuda``), both
exposing ``select``, ``mask_norms``, ``della_keep`` and ``fused_merge`` with the same keywords.

A merge is at most three kinds of pass, none of which stacks the K inputs or copies them:

1. exact top-k thresholds ``(T, J)`` per range mask (``select``), kept on the device;
2. only for norm-matching rescale or DELLA: per-model norms before/after masking (DELLA also
   writes a byte keep mask after one stable ``torch.sort`` of each row's magnitude keys);
3. the fused merge: base + K inputs read once, the output written once, masks evaluated on the
   fly (thresholds, Philox counters, DELLA bytes). The norm-matching scales are computed on the
   device, so the only host sync is reading the kernel's non-finite flags at the end.

Inputs are read in place, with their strides, when their leading dimensions collapse into one
stride (contiguous tensors, transposed matrices, row slices, broadcasts); anything else is
copied once (``.contiguous()``).
"""
from __future__ import annotations

import contextlib

import torch

from .. import _validate as V
from .. import abi
from .._transfer import to_device, to_host
from .._semantics import NORM_EPS, MaskSpec, Plan, rows_of, weight_sum_divisor
from ..formats import FP8_DTYPES, Int4Config, fp8_scale_shape, raise_quant_flags
from . import _host


def _device(dev: torch.device):
    """Launch on the inputs' device (Triton and the CUDA launchers use the current device)."""
    if dev.type == "cuda":
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


def strides_2d(t: torch.Tensor):
    """``(s0, s1)`` such that logical element ``i`` of ``t`` sits at ``(i // C) * s0 + (i % C) * s1``
    with ``C = t.shape[-1]``, or None when the leading dimensions do not collapse."""
    if t.dim() == 0:
        return (1, 1)
    C = t.shape[-1]
    if t.is_contiguous():
        return (C, 1)
    lead = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    for (_, outer), (size, inner) in zip(lead, lead[1:]):
        if outer != inner * size:
            return None
    return (lead[-1][1] if lead else 0, t.stride(-1))


def layout(base, inputs):
    """``(base, base_strides, inputs, strides, C, strided)``: inputs to read in place (copied
    only when their strides do not collapse to two) and their row/column strides."""
    C = inputs[0].shape[-1] if inputs[0].dim() else 1

    def one(t):
        st = strides_2d(t)
        if st is None:
            t = t.contiguous()
            st = (C, 1) if t.dim() else (1, 1)
        return t, st

    pairs = [one(t) for t in inputs]
    xs, sts = [p[0] for p in pairs], [p[1] for p in pairs]
    bst = (C, 1)
    if base is not None:
        base, bst = one(base)
    contiguous = (C, 1) if inputs[0].dim() else (1, 1)
    strided = any(s != contiguous for s in sts + [bst])
    return base, bst, xs, sts, C, strided


def thresholds(ks, base, bst, xs, sts, C, strided, masks, n, exact=False):
    """``(thr, missed)``: int64 ``[K, 4]`` device tensor ``(T_stop, J_stop, T_start, J_start)``
    per model, the top sets of ``stop`` and ``start`` elements (a range keeps ``top(stop) -
    top(start)``), and None or an int32 device tensor, nonzero when the kernel set's deferred
    select missed a bracket (``thr`` is then wrong: redo with ``exact=True``). No host read
    unless ``exact`` or the kernel set has no deferred select."""
    dev = xs[0].device
    host = [abi.NONE_T, -1, abi.NONE_T, -1] * len(masks)
    qm, qk, slots = [], [], []
    for m, spec in enumerate(masks):
        if spec.kind != "range":
            continue
        for j, k in ((0, spec.stop), (2, spec.start)):
            if k <= 0:
                continue
            if k >= n:
                host[4 * m + j], host[4 * m + j + 1] = 0, n
            else:
                qm.append(m)
                qk.append(k)
                slots.append(4 * m + j)
    thr = to_device(host, torch.int64, dev)
    missed = None
    if qm:
        args = dict(qm=qm, qk=qk, n=n, C=C, strides=sts, base_strides=bst, strided=strided)
        deferred = getattr(ks, "select_deferred", None)
        if deferred is not None and not exact:
            tj, missed = deferred(base, xs, **args)
            missed = missed.amax().reshape(1)
        else:
            tj = ks.select(base, xs, **args)
        at = to_device(slots, torch.int64, dev)
        thr[at] = tj[:, 0]
        thr[at + 1] = tj[:, 1]
    return thr, missed


def della_keeps(ks, base, bst, xs, sts, C, strided, masks, seed, norm, shape):
    """Byte keep masks of the DELLA models and their norms (fp64 ``[K, 2]``)."""
    K, n = len(xs), xs[0].numel()
    dev = xs[0].device
    keeps = [None] * K
    norms = torch.zeros(K, 2, dtype=torch.float64, device=dev)
    outer, L, inner = rows_of(shape)
    for m, spec in enumerate(masks):
        if spec.kind != "della":
            continue
        d = xs[m].to(torch.float32)
        if base is not None:
            d = d - base.to(torch.float32)
        keys = d.view(torch.int32) & 0x7FFFFFFF
        del d
        rows = keys.reshape(outer, L, inner).transpose(1, 2).reshape(-1, L)
        # stable: equal magnitudes keep ascending index order (the reference's priority order)
        # (contiguous: sort may return indices in the strides of a non-contiguous input)
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices.contiguous()
        del keys, rows
        keeps[m], norms[m] = ks.della_keep(
            base, xs[m], order, stream=m, c1=spec.c1, c2=spec.c2, seed=seed, n=n, L=L,
            inner=inner, C=C, strides=sts[m], base_strides=bst, strided=strided, norm=norm or 1)
    return keeps, norms


def _merge_args(ks, plan: Plan, base, inputs, exact=False):
    """Run the passes before the fused merge (thresholds, DELLA bytes, norm-matching scales)
    and return ``(base, xs, kwargs, missed)``: the fused pass's inputs and keywords
    (``ks.fused_merge`` and ``fused_merge_int4`` take the same ones), and the device flag of a
    missed selection bracket (None: none possible), read with the merge's flags; when set, the
    merge is redone with ``exact=True``. Call inside ``_device``."""
    n = inputs[0].numel()
    dev = inputs[0].device
    base, bst, xs, sts, C, strided = layout(base, inputs)
    K = len(xs)
    masks: list[MaskSpec] = plan.masks
    kinds = [abi.MASK_OF_SPEC[m.kind] for m in masks]
    norm = plan.rescale if plan.rescale in ("l1", "l2", "linf") else None
    thr, missed = thresholds(ks, base, bst, xs, sts, C, strided, masks, n, exact)
    keeps, norms = della_keeps(ks, base, bst, xs, sts, C, strided, masks, plan.seed,
                               abi.NORM_OF_PLAN[norm] if norm else None, inputs[0].shape)
    for m, spec in enumerate(masks):  # drawn by the caller: one keep byte per element
        if spec.kind == "given":
            keeps[m] = spec.keep.reshape(-1).to(device=dev, dtype=torch.uint8).contiguous()
    probs = [m.p for m in masks]
    scale_mode = abi.SCALE_NONE
    scale = torch.ones(K, dtype=torch.float32, device=dev)
    if plan.rescale == "density":
        scale_mode = abi.SCALE_DIV
        host, kinds = _host.density_scales(masks, kinds)
        scale = to_device(host, torch.float32, dev)
    elif norm is not None:
        scale_mode = abi.SCALE_MUL
        flat = [k if m.kind in ("range", "random") else 0 for m, k in zip(masks, kinds)]
        if any(flat):
            norms = norms + ks.mask_norms(base, xs, kinds=flat, thr=thr, probs=probs,
                                          seed=plan.seed, n=n, C=C, strides=sts,
                                          base_strides=bst, strided=strided, norm=abi.NORM_OF_PLAN[norm])
        before, after = norms[:, 0], norms[:, 1]
        applies = to_device([m.kind in ("range", "random", "della") for m in masks], torch.bool, dev)
        ok = applies & (before >= NORM_EPS) & (after >= NORM_EPS)
        # fp32(|d| / |keep * d|), the double ratio rounded once (reference: norm_scale)
        scale = torch.where(ok, before / torch.where(ok, after, 1.0), 1.0).to(torch.float32)
        for m, spec in enumerate(masks):
            if spec.kind == "given":
                f = _host.given_scale(spec, base, inputs[m], norm)
                scale[m] = 1.0 if f is None else f
    wsum = weight_sum_divisor(plan)
    return base, xs, dict(
        kinds=kinds, thr=thr, scale=scale, weights=plan.weights, probs=probs,
        keeps=keeps, seed=plan.seed, n=n, C=C, strides=sts, base_strides=bst, strided=strided,
        scale_mode=scale_mode, consensus=abi.CONSENSUS_OF_PLAN[plan.consensus],
        elect_weighted=plan.elect_weighted, divisor=abi.DIVISOR_OF_PLAN[plan.divisor],
        const_div=wsum if wsum is not None else 1.0, normalize=plan.normalize, lam=plan.lam), missed


def _with_missed(flags, missed):
    """The flags to read in the one host read, the missed-bracket flag last (0 when none)."""
    return torch.cat([flags, missed if missed is not None else torch.zeros_like(flags[:1])])


def run_plan(ks, plan: Plan, base, inputs, out_dtype) -> torch.Tensor:
    """Execute ``plan`` on kernel set ``ks`` (semantics: ``fastmerge/backends/torch.py``)."""
    shape, dev = inputs[0].shape, inputs[0].device
    out = torch.empty(shape, dtype=out_dtype, device=dev)
    if out.numel() == 0:
        return out
    with _device(dev):
        for exact in (False, True):
            base_, xs, kw, missed = _merge_args(ks, plan, base, inputs, exact)
            flags = ks.fused_merge(base_, xs, out, **kw)
            # the kernels flag non-finite inputs, not results: an overflow from finite inputs
            # is found by one reduction over the output, read in the same host read as the
            # flags and the selection's missed-bracket flag
            flags = to_host(_with_missed(torch.cat([flags, _host.result_flag(out)]), missed))
            _host.raise_nonfinite(flags[:len(xs) + 1], _host.merge_names(plan, len(xs)))
            if not flags[-1]:  # the thresholds were exact: this merge stands
                break
        _host.raise_merge_flags(flags[:-1], _host.merge_names(plan, len(xs)))
    return out


# ---- quantizers (fastmerge.quant; kernels: triton_kernels/quant.py) ----------------------------

def quantize_launch(qks, w: torch.Tensor, cfg):
    """Launch the Triton quantizers ``qks`` (``fastmerge.triton_kernels``) on ``w`` (validated
    by fastmerge.quant) without reading their flags (no host sync): ``(result, flags)`` with the
    result the raw tensors of ``cfg``'s format (a dict for INT4, ``(q, scale)`` for FP8) and
    ``flags`` the device flags :func:`fastmerge.quant.raise_quant_flags` reads."""
    w = w.contiguous()
    with _device(w.device):
        if isinstance(cfg, Int4Config):
            return qks.quantize_int4(w, cfg)
        dt = FP8_DTYPES[cfg.fmt]
        q, scale, flags = qks.quantize_fp8(w, dt, cfg.granularity, cfg.block)
        eps = torch.finfo(torch.float32).eps
        if cfg.granularity == "tensor":
            # the reference's own ops on the amax: (amax in w's dtype) / fmax, then fp32, 0 -> eps
            scale = (scale.to(w.dtype) / torch.finfo(dt).max).to(torch.float32)
            scale = torch.where(scale == 0, eps, scale)
            qks.fp8_codes(w, q, scale, flags)
        elif w.numel() == 0:
            scale.fill_(eps)  # no cell ran: the reference's amax of nothing is 0
        scale = scale.reshape(fp8_scale_shape(tuple(w.shape), cfg.granularity, cfg.block))
    return (q, scale), flags


def quantize(qks, w: torch.Tensor, cfg, name: str = "w"):
    """INT4 or FP8 quantization of ``w`` with the Triton quantizers ``qks``, bit-identical to
    the torch reference; its flags are read once (the one host sync)."""
    res, flags = quantize_launch(qks, w, cfg)
    raise_quant_flags(to_host(flags), name)
    return res


def run_plan_quantized(ks, plan: Plan, base, inputs, out_dtype, cfg):
    """The merge of ``plan`` on the Triton kernels ``ks``, quantized. INT4 runs in one pass:
    each program merges a tile of rows by one group, rounds it to ``out_dtype`` and quantizes
    it, and the merged tensor is never written. FP8 merges, then quantizes: its scales need a
    whole row, block or tensor first, and re-merging for a second pass would read the K + 1
    inputs twice, more traffic than writing and reading the merged tensor once."""
    if not isinstance(cfg, Int4Config) or inputs[0].numel() == 0:
        return quantize(ks, run_plan(ks, plan, base, inputs, out_dtype), cfg, "the merged tensor")
    with _device(inputs[0].device):
        for exact in (False, True):
            base_, xs, kw, missed = _merge_args(ks, plan, base, inputs, exact)
            res, flags = ks.fused_merge_int4(base_, xs, cfg, out_dtype, **kw)
            f = to_host(_with_missed(flags, missed))
            K = len(xs)
            _host.raise_nonfinite(f[:K + 1], _host.merge_names(plan, K))
            if not f[-1]:
                break
        f = f[:-1]
        _host.raise_merge_flags([0, f[-2]], [])  # the inputs are finite: a non-finite merge overflowed
        raise_quant_flags(f[K + 1:], V.MERGED)
    return res


def _elect(ks, tensors, weights, consensus, sign, sign_only, divisor="none", out=None):
    K, n = len(tensors), tensors[0].numel()
    dev = tensors[0].device
    with _device(dev):
        _, bst, xs, sts, C, strided = layout(None, tensors)
        flags = ks.fused_merge(
            None, xs, out, kinds=[abi.MASK_NONE] * K, thr=torch.zeros(4 * K, dtype=torch.int64, device=dev),
            scale=torch.ones(K, dtype=torch.float32, device=dev), weights=weights, probs=[1.0] * K,
            keeps=[None] * K, seed=0, n=n, C=C, strides=sts, base_strides=bst, strided=strided,
            scale_mode=abi.SCALE_NONE, consensus=abi.CONSENSUS_OF_PLAN[consensus],
            elect_weighted=consensus != "given", divisor=abi.DIVISOR_OF_PLAN[divisor], const_div=1.0, normalize=True, lam=1.0, sign=sign,
            sign_only=sign_only)
        names = [f"tensors[{m}]" for m in range(K)]
        if out is None:
            _host.raise_nonfinite(to_host(flags), names)
        else:  # disjoint_merge: its sums can overflow from finite inputs
            _host.raise_merge_flags(to_host(torch.cat([flags[:K], _host.result_flag(out)])), names)


def elect_sign(ks, tensors, weights, method):
    sign = torch.empty(tensors[0].shape, dtype=torch.int8, device=tensors[0].device)
    if sign.numel():
        _elect(ks, tensors, weights, method, sign, True)
    return sign


def disjoint_merge(ks, tensors, sign, weights, divisor, out_dtype):
    out = torch.empty(tensors[0].shape, dtype=out_dtype, device=tensors[0].device)
    if out.numel():
        _elect(ks, tensors, weights, "given", _host.sign_input(sign), False, divisor, out)
    return out


def magnitude_threshold(ks, x, k):
    """The k-th largest ``|x|`` (``inf`` for k == 0), a 0-d tensor of x's dtype on x's device."""
    shortcut = _host.threshold_without_select(x, k)
    if shortcut is not None:
        return shortcut
    n = x.numel()
    with _device(x.device):
        _, bst, xs, sts, C, strided = layout(None, [x])
        flag = torch.zeros(1, dtype=torch.int32, device=x.device)
        tj = ks.select(None, xs, qm=[0], qk=[k], n=n, C=C, strides=sts, base_strides=bst,
                       strided=strided, flag=flag)
        _host.raise_nonfinite(to_host(flag), ["x"])
        return tj[0, 0].to(torch.int32).view(torch.float32).to(x.dtype)
