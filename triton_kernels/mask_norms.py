"""Norms of each delta before and after masking, for mergekit's norm-matching rescale
(``s_m = |d_m| / |keep_m * d_m|``, L1 by default; L2 and Linf on request).

Only flat masks (top-k ranges and DARE's Philox drop) are handled here; DELLA's rank-based
masks get their norms from ``della``. One pass over base + the masked inputs; per-program
partial sums are accumulated in fp64 (as the reference's ``x.double()``) and written to a
``[P, K, 2]`` buffer that the host reduces in a fixed order, so the result is deterministic.
"""
import torch
import triton
import triton.language as tl

from .. import abi
from ._common import (MASK_RANDOM, MASK_RANGE, flat_keep, group_tile, load_base, minus_base,
                      norm_reduce, norm_terms, seed_key, split_seed, vec_width, warps_for)


@triton.jit(do_not_specialize=["k0", "k1", "C"])
def _mask_norms_kernel(base, xs, thr, probs, partial, bs0, bs1, S0, S1, k0, k1, n, C,
                       K: tl.constexpr, KINDS: tl.constexpr, NORM: tl.constexpr,
                       HAS_BASE: tl.constexpr, STRIDED: tl.constexpr, G: tl.constexpr,
                       VEC: tl.constexpr):
    pid, g, col, i, inb = group_tile(n, G, VEC)
    key0, key1 = seed_key(k0, k1)
    b = load_base(base, i, inb, C, bs0, bs1, HAS_BASE, STRIDED)
    for m in tl.static_range(K):
        if KINDS[m] == MASK_RANGE or KINDS[m] == MASK_RANDOM:
            d = minus_base(xs[m], b, i, inb, C, S0[m], S1[m], HAS_BASE, STRIDED)
            keep = flat_keep(d, i, g, col, m, KINDS[m], thr, probs[m], key0, key1)
            v, kept = norm_terms(d, keep, NORM)
            tl.store(partial + (pid * K + m) * 2, norm_reduce(v, NORM))
            tl.store(partial + (pid * K + m) * 2 + 1, norm_reduce(kept, NORM))


def mask_norms(base, xs, *, kinds, thr, probs, seed, n, C, strides, base_strides, strided, norm):
    """``[K, 2]`` fp64 device tensor of (norm of d_m, norm of keep_m * d_m) for every model
    whose kind is a range or random mask (zeros elsewhere); L2 norms are returned squared-summed
    and square-rooted here."""
    K = len(xs)
    G = 256
    P = triton.cdiv(n, 4 * G)
    partial = torch.zeros(P, K, 2, dtype=torch.float64, device=xs[0].device)
    k0, k1 = split_seed(seed)
    vec = vec_width(max(t.element_size() for t in list(xs) + ([base] if base is not None else [])), G)
    _mask_norms_kernel[(P,)](
        base if base is not None else partial, tuple(xs), thr, tuple(float(p) for p in probs), partial,
        base_strides[0], base_strides[1], tuple(s[0] for s in strides), tuple(s[1] for s in strides),
        k0, k1, n, C, K=K, KINDS=tuple(kinds), NORM=norm, HAS_BASE=base is not None,
        STRIDED=strided, G=G, VEC=vec, num_warps=warps_for(G, vec), enable_fp_fusion=False,
    )
    if norm == abi.NORM_LINF:
        return partial.amax(dim=0)
    total = partial.sum(dim=0)
    return total.sqrt() if norm == abi.NORM_L2 else total
