"""The fused merge pass: base + K inputs read once, the output written once.

Per element, with ``d_m = x_m - base`` (fp32; ``x_m`` alone without a base), mask ``keep_m``
and the plan's rescale ``s_m``, weight ``w_m`` (formulas: ``fastmerge/reference.py``)::

    t_m   = (keep_m ? d_m : +0) * s_m      (or / s_m for DARE's 1/density rescale)
    v_m   = w_m * t_m
    M     = sum_m e_m >= 0 ? +1 : -1       e_m = v_m (mergekit) or t_m (PEFT); "count": sign(e_m)
    mixed = sum_m [sign(e_m) == M] v_m     (without consensus: sum_m v_m)
    div   = sum_m [sign(e_m) == M] w_m     (or the count of agreeing inputs, or sum_m w_m)
    out   = base + lam * (normalize ? mixed / div : mixed)

Masks are evaluated on the fly: top-k ranges from (threshold, tie index) pairs found by
``magnitude_select``, DARE from Philox counters, DELLA from a precomputed byte mask. Every
multiply, add and divide is rounded separately (the launch disables FMA contraction and
divisions are ``div_rn``), in model order, exactly like the reference, so results agree bit for
bit with the ``cpu`` backend.

Kernel launch shape: one program per ``G`` groups of four elements (``4 * G`` elements), 64-bit
indices throughout; ``G`` shrinks as K grows so that the K per-model values a consensus merge
keeps live stay in registers.
"""
import torch
import triton
import triton.language as tl

from .. import abi
from ._common import (MASK_BITS, MASK_RANDOM, MASK_RANGE, MASK_ZERO, flat_keep, group_tile,
                      load_f32, nonfinite, seed_key, split_seed, store_as, vec_width, warps_for)

# plan codes (fastmerge/abi.py)
CONSENSUS_NONE = tl.constexpr(abi.CONSENSUS_NONE)
CONSENSUS_SUM = tl.constexpr(abi.CONSENSUS_SUM)
CONSENSUS_COUNT = tl.constexpr(abi.CONSENSUS_COUNT)
CONSENSUS_GIVEN = tl.constexpr(abi.CONSENSUS_GIVEN)
DIVISOR_COUNT = tl.constexpr(abi.DIVISOR_COUNT)
DIVISOR_CONST = tl.constexpr(abi.DIVISOR_CONST)
SCALE_MUL = tl.constexpr(abi.SCALE_MUL)
SCALE_DIV = tl.constexpr(abi.SCALE_DIV)


@triton.jit
def merge_tile(
    base, xs, keeps, sign, flags, thr, scale, weights, probs, bs0, bs1, S0, S1, key0, key1,
    g, col, i, inb, C, const_div, lam,
    K: tl.constexpr, KINDS: tl.constexpr, HAS_BASE: tl.constexpr, STRIDED: tl.constexpr,
    SCALE_MODE: tl.constexpr, CONSENSUS: tl.constexpr, ELECT_WEIGHTED: tl.constexpr,
    DIVISOR: tl.constexpr, NORMALIZE: tl.constexpr, SIGN_ONLY: tl.constexpr,
    APPLY_LAM: tl.constexpr,
):
    """The merged fp32 values of the ``[G, 4]`` tile ``i`` (groups ``g``, columns ``col``),
    non-finite inputs flagged in ``flags``; with ``SIGN_ONLY`` the elected signs are stored in
    ``sign`` instead (the returned values are then meaningless). Shared by the merge kernel and
    the fused merge->quantize kernel (``quant.py``)."""
    zero = tl.zeros(i.shape, tl.float32)
    b = zero
    if HAS_BASE:
        b = load_f32(base, i, inb, C, bs0, bs1, STRIDED)
        tl.store(flags + K, 1, mask=nonfinite(b))
    total = zero
    mixed = zero
    es = ()
    vs = ()
    for m in tl.static_range(K):
        d = load_f32(xs[m], i, inb, C, S0[m], S1[m], STRIDED)
        tl.store(flags + m, 1, mask=nonfinite(d))
        if HAS_BASE:
            d = d - b
        if KINDS[m] == MASK_ZERO:
            d = zero
        elif KINDS[m] == MASK_RANGE or KINDS[m] == MASK_RANDOM:
            d = tl.where(flat_keep(d, i, g, col, m, KINDS[m], thr, probs[m], key0, key1), d, 0.0)
        elif KINDS[m] == MASK_BITS:
            kb = tl.load(keeps[m] + i, mask=inb, other=0)
            d = tl.where(kb != 0, d, 0.0)
        if SCALE_MODE == SCALE_MUL:
            d = d * tl.load(scale + m)
        elif SCALE_MODE == SCALE_DIV:
            d = tl.math.div_rn(d, zero + tl.load(scale + m))
        v = d * weights[m]
        if CONSENSUS == CONSENSUS_NONE:
            mixed = mixed + v
        else:
            if ELECT_WEIGHTED:
                e = v
            else:
                e = d
            if CONSENSUS == CONSENSUS_SUM:
                total = total + e
            elif CONSENSUS == CONSENSUS_COUNT:
                total = total + ((e > 0.0).to(tl.float32) - (e < 0.0).to(tl.float32))
            es = es + (e,)
            vs = vs + (v,)
    if CONSENSUS == CONSENSUS_GIVEN:
        sg = tl.load(sign + i, mask=inb, other=1)
        total = tl.where(sg > 0, 1.0, -1.0) + zero
    if SIGN_ONLY:
        tl.store(sign + i, tl.where(total >= 0.0, 1, -1).to(tl.int8), mask=inb)
    else:
        div = zero
        if CONSENSUS != CONSENSUS_NONE:
            positive = total >= 0.0
            for m in tl.static_range(K):
                e = es[m]
                agree = tl.where(positive, e > 0.0, e < 0.0)
                mixed = mixed + tl.where(agree, vs[m], 0.0)
                if DIVISOR == DIVISOR_COUNT:
                    div = div + tl.where(agree, 1.0, 0.0)
                else:
                    div = div + tl.where(agree, weights[m], 0.0)
            if DIVISOR == DIVISOR_COUNT:
                div = tl.maximum(div, 1.0)
            else:
                div = tl.where(div == 0.0, 1.0, div)
        if NORMALIZE:
            if CONSENSUS != CONSENSUS_NONE:
                mixed = tl.math.div_rn(mixed, div)
            elif DIVISOR == DIVISOR_CONST:
                mixed = tl.math.div_rn(mixed, zero + const_div)
        if APPLY_LAM:
            mixed = mixed * lam
        if HAS_BASE:
            mixed = b + mixed
    return mixed


@triton.jit(do_not_specialize=["k0", "k1", "C", "const_div", "lam"])
def _fused_merge_kernel(
    base, xs, keeps, out, sign, flags, thr, scale, weights, probs,
    bs0, bs1, S0, S1, k0, k1, n, C, const_div, lam,
    K: tl.constexpr, KINDS: tl.constexpr, HAS_BASE: tl.constexpr, STRIDED: tl.constexpr,
    SCALE_MODE: tl.constexpr, CONSENSUS: tl.constexpr, ELECT_WEIGHTED: tl.constexpr,
    DIVISOR: tl.constexpr, NORMALIZE: tl.constexpr, SIGN_ONLY: tl.constexpr,
    APPLY_LAM: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr,
):
    pid, g, col, i, inb = group_tile(n, G, VEC)
    key0, key1 = seed_key(k0, k1)
    mixed = merge_tile(base, xs, keeps, sign, flags, thr, scale, weights, probs, bs0, bs1, S0, S1,
                       key0, key1, g, col, i, inb, C, const_div, lam, K, KINDS, HAS_BASE, STRIDED,
                       SCALE_MODE, CONSENSUS, ELECT_WEIGHTED, DIVISOR, NORMALIZE, SIGN_ONLY, APPLY_LAM)
    if not SIGN_ONLY:
        store_as(out + i, mixed, inb)


def groups_per_program(K: int) -> int:
    """Groups of four elements per program: fewer as K grows (a consensus merge keeps 2K values
    per element live until the election is done)."""
    return 256 if K <= 4 else 128 if K <= 8 else 64 if K <= 16 else 32


def launch_args(base, xs, flags, *, kinds, thr, scale, weights, probs, keeps, seed, C, strides,
                base_strides, strided, scale_mode, consensus, elect_weighted, divisor, const_div,
                normalize, lam, sign=None):
    """The keyword arguments of :func:`merge_tile`'s inputs and options, by the names both the
    merge kernel and the fused merge->INT4 kernel (``quant.py``) give them. ``xs``/``base``
    are the input tensors (read in place with ``strides`` when ``strided``); ``thr`` int64
    ``[K, 4]`` and ``scale`` fp32 ``[K]`` live on the device; ``keeps`` holds a uint8 mask per
    MASK_BITS model (None elsewhere); absent tensors are replaced by ``flags`` (never read)."""
    k0, k1 = split_seed(seed)
    return dict(
        base=base if base is not None else flags, xs=tuple(xs),
        keeps=tuple(k if k is not None else flags for k in keeps),
        sign=sign if sign is not None else flags, flags=flags, thr=thr, scale=scale,
        weights=tuple(float(w) for w in weights), probs=tuple(float(p) for p in probs),
        bs0=base_strides[0], bs1=base_strides[1], S0=tuple(s[0] for s in strides),
        S1=tuple(s[1] for s in strides), k0=k0, k1=k1, C=C, const_div=float(const_div),
        lam=float(lam), K=len(xs), KINDS=tuple(kinds), HAS_BASE=base is not None,
        STRIDED=strided, SCALE_MODE=scale_mode, CONSENSUS=consensus,
        ELECT_WEIGHTED=elect_weighted, DIVISOR=divisor, NORMALIZE=normalize,
        APPLY_LAM=lam != 1.0, num_warps=4, enable_fp_fusion=False)


def fused_merge(base, xs, out, *, n, sign=None, sign_only=False, **kw):
    """Launch the merge pass over ``n`` elements into ``out`` (arguments: :func:`launch_args`).
    Returns the int32 non-finite flags ``[K + 1]`` (inputs, then base) on the device."""
    K = len(xs)
    flags = torch.zeros(K + 1, dtype=torch.int32, device=xs[0].device)
    G = groups_per_program(K)
    size = max(t.element_size() for t in list(xs) + [base, out] if t is not None)
    vec = vec_width(size, G)
    args = launch_args(base, xs, flags, sign=sign, **kw)
    args["num_warps"] = warps_for(G, vec)
    _fused_merge_kernel[(triton.cdiv(n, 4 * G),)](
        out=out if out is not None else flags, n=n, SIGN_ONLY=sign_only, G=G, VEC=vec, **args)
    return flags
