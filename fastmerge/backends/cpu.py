"""The ``cpu`` backend: drives the fused C++ kernels (csrc/) for a merge plan.

A merge runs as at most three streaming passes over the inputs, never materialising a
``(K, *shape)`` stack or a dense mask (see csrc/fused_merge.cpp and the passes before it):

1. exact top-k thresholds for magnitude masks (radix select over the fp32 bit patterns),
2. only when norm-matching rescale or DELLA needs them: per-model norms, and the random keep
   decisions as bit masks (K * N / 8 bytes, 1/32 of an fp32 tensor per model),
3. the fused merge: base + K inputs read once, the output written once.

The TIES family (range masks, no rescale) from 2^20 elements skips pass 1: select_merge finds
the exact thresholds during the merge pass itself (csrc/select_merge.cpp), and falls back to
passes 1 and 3 when its sampled bracket misses.
"""
from __future__ import annotations

import math

import torch

from .. import _validate as V
from .. import abi
from .._semantics import MaskSpec, Plan, norm_scale, rows_of, weight_sum_divisor
from ..formats import (FP8_DTYPES, FP8Config, fill_empty_scales, fp8_scale_shape, int4_outputs,
                       raise_quant_flags)
from . import _host, _native

NAME = "cpu"
_DT = abi.dtype_code


def status() -> dict:
    lib = _native.lib()
    if lib is None:
        return {"available": False, "reason": f"native module not loaded: {_native.error()}"}
    return {"available": True, "reason": f"C++/OpenMP kernels ({lib.__name__}, {lib.isa()}, "
                                         f"{lib.max_threads()} OpenMP threads)"}


def _lib():
    return _native.lib()


_threads = _native.threads  # OpenMP threads for n elements (shared with cpu_methods)


def _ptrs(tensors):
    return [t.data_ptr() for t in tensors]


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _raise_merge_flags(flags, plan, inputs, base):
    """The K+2 flags of a merge: per input, base, then "some input" (mask-free plans check
    their fp32 result instead of every input): only then are the inputs rescanned, to name
    one; when all are finite, that result overflowed."""
    names = _host.merge_names(plan, len(inputs))
    K = len(inputs)
    _host.raise_nonfinite(flags[:K + 1], names)
    if flags[K + 1]:
        V.name_nonfinite(list(inputs) + [base], names)
        raise V.NonFiniteError(V.MERGED, overflow=True)


def _result_checked(margs, out_dtype) -> bool:
    """Whether the kernel's flags already cover an overflow of the result: its plain path (no
    masks, rescale or consensus: the condition of ``MergeBlock::plain_``, read off the very
    arguments passed) checks the fp32 result, which is the output when that is fp32. Every
    other merge needs :func:`_check_output`'s pass."""
    kinds, scale_mode, consensus = margs[0], margs[7], margs[8]
    return (out_dtype == torch.float32 and scale_mode == abi.SCALE_NONE
            and consensus == abi.CONSENSUS_OF_PLAN[None] and all(k == abi.MASK_NONE for k in kinds))


def _thresholds(base, inputs, masks, n):
    """(T_stop, J_stop, T_start, J_start) per model from one multi-query radix select."""
    q_model, q_k = [], []
    for m, spec in enumerate(masks):
        if spec.kind == "range":
            q_model += [m, m]
            q_k += [spec.stop, spec.start]
    ranges = [abi.NONE_T, -1, abi.NONE_T, -1] * len(masks)
    if q_model:
        res = _lib().select_ranges(base.data_ptr() if base is not None else 0, _ptrs(inputs),
                                   _DT(inputs[0].dtype), n, q_model, q_k, _threads(n))
        for q, m in enumerate(q_model):
            off = 4 * m + (0 if q % 2 == 0 else 2)
            ranges[off], ranges[off + 1] = res[2 * q], res[2 * q + 1]
    return ranges


def _merge_args(plan: Plan, base, inputs):
    """The fused merge's arguments for ``plan`` on contiguous ``inputs`` (and ``base``):
    ``(base ptr, input ptrs, dtype code, n)``, the 14 mask/merge arguments shared by
    ``fused_merge`` and ``fused_merge_quantize``, and the bit-mask buffers that must outlive
    the kernel call."""
    lib = _lib()
    shape = inputs[0].shape
    n = inputs[0].numel()
    K = len(inputs)
    dt = _DT(inputs[0].dtype)
    bptr = base.data_ptr() if base is not None else 0
    masks: list[MaskSpec] = plan.masks
    kinds = [abi.MASK_OF_SPEC[m.kind] for m in masks]
    ranges = _thresholds(base, inputs, masks, n)
    probs = [m.p for m in masks]
    norm = plan.rescale if plan.rescale in ("l1", "l2", "linf") else None

    # bit masks: DELLA always; DARE when its norms must be known before the merge
    bits = [None] * K
    for m, spec in enumerate(masks):
        if spec.kind == "given":  # drawn by the caller: packed once, read by the merge pass
            bits[m] = _host.pack_bits(spec.keep)
        elif spec.kind == "della" or (spec.kind == "random" and norm is not None):
            bits[m] = torch.zeros((n + 63) // 64, dtype=torch.int64)
            kinds[m] = abi.MASK_BITS
    bit_ptrs = [b.data_ptr() if b is not None else 0 for b in bits]

    norms = [0.0] * (2 * K)
    flat = [m for m, s in enumerate(masks) if s.kind in ("range", "random")]
    if norm is not None and flat:
        flat_kinds = [abi.MASK_OF_SPEC[s.kind] if s.kind in ("range", "random") else 0 for s in masks]
        res = lib.mask_norms(bptr, _ptrs(inputs), dt, n, flat_kinds, ranges, probs, plan.seed,
                             bit_ptrs, abi.NORM_OF_PLAN[norm], _threads(n))
        for m in flat:
            norms[2 * m], norms[2 * m + 1] = res[2 * m], res[2 * m + 1]
    della = [m for m, s in enumerate(masks) if s.kind == "della"]
    if della:
        outer, length, inner = rows_of(shape)
        res = lib.della_bits(bptr, _ptrs(inputs), dt, outer, length, inner, della,
                             [masks[m].c1 if m in della else 0.0 for m in range(K)],
                             [masks[m].c2 if m in della else 0.0 for m in range(K)],
                             plan.seed, bit_ptrs, abi.NORM_OF_PLAN[norm], _threads(n))
        for m in della:
            norms[2 * m], norms[2 * m + 1] = res[2 * m], res[2 * m + 1]

    scale, scale_mode = [1.0] * K, abi.SCALE_NONE
    if plan.rescale == "density":
        scale_mode = abi.SCALE_DIV
        scale, kinds = _host.density_scales(masks, kinds)
    elif norm is not None:
        scale_mode = abi.SCALE_MUL
        for m, s in enumerate(masks):
            f = (_host.given_scale(s, base, inputs[m], norm) if s.kind == "given"
                 else norm_scale(norms[2 * m], norms[2 * m + 1]))
            if s.kind in ("range", "random", "della", "given") and f is not None:
                scale[m] = f

    wsum = weight_sum_divisor(plan)
    const_div = wsum if wsum is not None else 1.0
    margs = (kinds, ranges, probs, bit_ptrs, plan.seed, plan.weights, scale, scale_mode,
             abi.CONSENSUS_OF_PLAN[plan.consensus], plan.elect_weighted, abi.DIVISOR_OF_PLAN[plan.divisor], const_div,
             plan.normalize, plan.lam)
    return (bptr, _ptrs(inputs), dt, n), margs, bits


# select_merge (csrc/select_merge.cpp): the TIES family's top-k masks found during the merge
# pass itself, from a sampled bracket; below 2^20 elements the separate exact select is cheap.
_ONE_PASS_MIN = 1 << 20
_ONE_PASS_MASKS = ("range", "none", "zero")


def _one_pass_cuts(plan: Plan, n: int):
    """(k_stop, k_start) per model when ``plan`` fits select_merge: range masks (and whole /
    dropped models), no rescale, consensus none/sum/count; else None. (What the kernel itself
    cannot take, more than 16 models or 2^31 elements, it declines: status 2.)"""
    masks = plan.masks
    if (n < _ONE_PASS_MIN or plan.rescale is not None
            or plan.consensus not in (None, "sum", "count")
            or not all(m.kind in _ONE_PASS_MASKS for m in masks)
            or not any(m.kind == "range" for m in masks)):
        return None
    k_stop = [m.stop if m.kind == "range" else (n if m.kind == "none" else 0) for m in masks]
    k_start = [m.start if m.kind == "range" else 0 for m in masks]
    return k_stop, k_start


def _run_one_pass(plan: Plan, base, inputs, out, cuts) -> bool:
    """The merge of ``plan`` into ``out`` by select_merge; False when its sampled bracket
    missed (the caller runs the exact select and the merge pass instead)."""
    n, K = out.numel(), len(inputs)
    wsum = weight_sum_divisor(plan)
    res = _lib().select_merge(base.data_ptr() if base is not None else 0, _ptrs(inputs), _DT(inputs[0].dtype),
                              out.data_ptr(), _DT(out.dtype), n, cuts[0], cuts[1], plan.weights,
                              abi.CONSENSUS_OF_PLAN[plan.consensus], plan.elect_weighted,
                              abi.DIVISOR_OF_PLAN[plan.divisor], wsum if wsum is not None else 1.0,
                              plan.normalize, plan.lam, _threads(n))
    status, flags = res[0], res[1:]
    if status != 0:
        return False
    names = _host.merge_names(plan, K)
    if any(flags[:K + 1]):
        # an inf/nan delta: a non-finite input (named here, in order), or finite inputs whose
        # difference overflowed, which the exact select and merge pass then handle as always
        V.name_nonfinite(list(inputs) + [base], names)
        return False
    if flags[K + 1]:
        raise V.NonFiniteError(V.MERGED, overflow=True)
    return True


def run_plan(plan: Plan, base, inputs, out_dtype) -> torch.Tensor:
    out = torch.empty(inputs[0].shape, dtype=out_dtype, device=inputs[0].device)
    if out.numel() == 0:
        return out
    inputs = [_contig(x) for x in inputs]
    base = _contig(base) if base is not None else None
    cuts = _one_pass_cuts(plan, out.numel())
    if cuts is not None and _run_one_pass(plan, base, inputs, out, cuts):
        return out
    (bptr, ptrs, dt, n), margs, _bits = _merge_args(plan, base, inputs)
    flags = _lib().fused_merge(bptr, ptrs, dt, out.data_ptr(), _DT(out_dtype), n, *margs, False, 0,
                               _threads(n))
    _raise_merge_flags(flags, plan, inputs, base)
    if not _result_checked(margs, out_dtype):  # the kernels flag non-finite inputs, not results
        V.check_result(out, list(inputs) + [base], _host.merge_names(plan, len(inputs)))
    return out


# ---- quantizers (csrc/quant.cpp) -----------------------------------------------------------
def _quant_outputs(cfg, shape, value_dtype):
    """Empty outputs of the quantizer ``cfg`` for a weight of ``shape`` (dict for INT4,
    ``(q, scale)`` for FP8) and the kernel's integer arguments and output pointers."""
    if isinstance(cfg, FP8Config):
        rows, cols = (math.prod(shape[:-1]), shape[-1])
        q = torch.empty(shape, dtype=FP8_DTYPES[cfg.fmt])
        scale = torch.empty(fp8_scale_shape(shape, cfg.granularity, cfg.block), dtype=torch.float32)
        qa = [abi.QUANT_FP8, rows, cols, 0, 0, abi.FP8_FORMAT_OF[cfg.fmt], abi.GRANULARITY_OF[cfg.granularity],
              *cfg.block, _DT(value_dtype)]
        return (q, scale), qa, [q.data_ptr(), scale.data_ptr(), 0]
    out_f, in_f = shape
    res = int4_outputs(cfg, out_f, in_f, value_dtype)
    qa = [abi.QUANT_OF_LAYOUT[cfg.layout], out_f, in_f, cfg.group_size, int(cfg.symmetric), 0, 0, 0, 0,
          _DT(value_dtype)]
    return res, qa, [t.data_ptr() for t in res.values()]


def quantize(w, cfg, name="w"):
    """INT4 or FP8 quantization of ``w`` (validated by fastmerge.quant) with the C++ kernels."""
    w = _contig(w)
    res, qa, outs = _quant_outputs(cfg, tuple(w.shape), w.dtype)
    if w.numel() == 0:
        return fill_empty_scales(res, cfg)
    raise_quant_flags(_lib().quantize(w.data_ptr(), _DT(w.dtype), qa, outs, _threads(w.numel())), name)
    return res


def run_plan_quantized(plan: Plan, base, inputs, out_dtype, cfg):
    """The merge of ``plan`` quantized, equal to ``quantize(run_plan(...))``: INT4 and per-row FP8
    in one pass (:func:`fused_merge_quantize`). A per-tensor scale needs every merged value first
    (the fused kernel would merge twice) and 128-row blocks read the inputs in short strided
    runs; both measured slower fused than merge-then-quantize, which they therefore run."""
    if isinstance(cfg, FP8Config) and cfg.granularity != "row":
        return quantize(run_plan(plan, base, inputs, out_dtype), cfg, "the merged tensor")
    return fused_merge_quantize(plan, base, inputs, out_dtype, cfg)


def fused_merge_quantize(plan: Plan, base, inputs, out_dtype, cfg):
    """One pass: each worker merges a segment of a row into a small fp32 buffer, rounds it to
    ``out_dtype`` and quantizes it; the merged tensor is never written. The kernel takes every
    format (per-tensor and block FP8 too, which :func:`run_plan_quantized` runs unfused)."""
    res, qa, outs = _quant_outputs(cfg, tuple(inputs[0].shape), out_dtype)
    if inputs[0].numel() == 0:
        return fill_empty_scales(res, cfg)
    inputs = [_contig(x) for x in inputs]
    base = _contig(base) if base is not None else None
    (bptr, ptrs, dt, n), margs, _bits = _merge_args(plan, base, inputs)
    flags = _lib().fused_merge_quantize(bptr, ptrs, dt, *margs, qa, outs, _threads(n))
    _raise_merge_flags(flags[:-2], plan, inputs, base)
    if flags[-2]:  # a non-finite value only the quantizer saw: an input, or the rounding overflowed
        _raise_merge_flags([0] * (len(inputs) + 1) + [1], plan, inputs, base)
    raise_quant_flags(flags, "the merged tensor")
    return res


def _elect(tensors, weights, consensus, sign, sign_only, divisor="none", out=None):
    tensors = [_contig(t) for t in tensors]
    K = len(tensors)
    n = tensors[0].numel()
    flags = _lib().fused_merge(
        0, _ptrs(tensors), _DT(tensors[0].dtype), out.data_ptr() if out is not None else 0,
        _DT(out.dtype) if out is not None else 0, n, [abi.MASK_NONE] * K,
        [abi.NONE_T, -1, abi.NONE_T, -1] * K, [1.0] * K, [0] * K, 0, weights, [1.0] * K,
        abi.SCALE_NONE, abi.CONSENSUS_OF_PLAN[consensus], consensus != "given",
        abi.DIVISOR_OF_PLAN[divisor], 1.0, True, 1.0, sign_only, sign.data_ptr(), _threads(n))
    names = [f"tensors[{m}]" for m in range(K)]
    _host.raise_nonfinite(flags, names)
    if out is not None:  # disjoint_merge: its sums can overflow from finite inputs
        V.check_result(out, tensors, names)


def elect_sign(tensors, weights, method):
    sign = torch.empty(tensors[0].shape, dtype=torch.int8)
    if sign.numel():
        _elect(tensors, weights, method, sign, True)
    return sign


def disjoint_merge(tensors, sign, weights, divisor, out_dtype):
    out = torch.empty(tensors[0].shape, dtype=out_dtype)
    if out.numel():
        _elect(tensors, weights, "given", _host.sign_input(sign), False, divisor, out)
    return out


def magnitude_threshold(x, k):
    shortcut = _host.threshold_without_select(x, k)
    if shortcut is not None:
        return shortcut
    x = _contig(x)
    T, _, nonfinite = _lib().select_ranges(0, [x.data_ptr()], _DT(x.dtype), x.numel(), [0], [k], _threads(x.numel()))
    _host.raise_nonfinite([nonfinite], ["x"])
    return torch.tensor([T], dtype=torch.int64).to(torch.int32).view(torch.float32)[0].to(x.dtype)
