"""DELLA-Merging's keep decisions (Deep et al. 2024, arXiv:2406.11617; mergekit's
``della_magprune``): within each row (dim 1), the element at priority position ``p`` (larger
``|d|`` first, lower index first among equals) has ascending rank ``a = L - 1 - p`` and keep
probability ``c1 + (a / (L - 1)) * c2``; it is kept iff its Philox uniform is below that.

The host sorts each row's magnitude keys once (``torch.sort``, stable, on the device) and hands
over the order; this kernel walks the order, so position ``p`` is known without a second sort,
and scatters one keep byte per element (read by the merge pass), accumulating the norms that
mergekit's L1 rescale needs (fp64 per program, reduced on the host in a fixed order).
"""
import torch
import triton
import triton.language as tl

from .. import abi
from ._common import block_tile, delta, norm_reduce, norm_terms, seed_key, split_seed, uniform_at


@triton.jit(do_not_specialize=["k0", "k1", "C", "c1", "c2", "L", "inner"])
def _della_keep_kernel(base, x, order, keep, partial, c1, c2, k0, k1, n, L, inner, C,
                       bs0, bs1, s0, s1, STREAM: tl.constexpr, NORM: tl.constexpr,
                       HAS_BASE: tl.constexpr, STRIDED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    q, valid = block_tile(pid, n, BLOCK)  # positions in the [rows, L] order
    r = q // L
    p = q - r * L
    t = tl.load(order + q, mask=valid, other=0)
    o = r // inner
    i = (o * L + t) * inner + (r - o * inner)             # logical flat index of the element
    d = delta(x, base, i, valid, C, s0, s1, bs0, bs1, HAS_BASE, STRIDED)
    a = (L - 1 - p).to(tl.float32)
    den = (tl.zeros([BLOCK], tl.int64) + (L - 1)).to(tl.float32)
    rn = tl.where(L > 1, tl.math.div_rn(a, tl.maximum(den, 1.0)), 0.0)
    prob = c1 + rn * c2
    key0, key1 = seed_key(k0, k1)
    kp = (uniform_at(i, STREAM, key0, key1) < prob) & valid
    tl.store(keep + i, kp.to(tl.uint8), mask=valid)
    v, kv = norm_terms(d, kp, NORM)
    tl.store(partial + pid * 2, norm_reduce(v, NORM))
    tl.store(partial + pid * 2 + 1, norm_reduce(kv, NORM))


def della_keep(base, x, order, *, stream, c1, c2, seed, n, L, inner, C, strides, base_strides,
               strided, norm):
    """``(keep, norms)``: uint8 keep mask in logical order, and fp64 ``[2]`` (norm of d, norm
    of the kept d; ``norm`` an ``abi.NORM_*`` code, NORM_NONE giving L1 (unused))."""
    BLOCK = 1024
    P = triton.cdiv(n, BLOCK)
    keep = torch.empty(n, dtype=torch.uint8, device=x.device)
    partial = torch.zeros(P, 2, dtype=torch.float64, device=x.device)
    k0, k1 = split_seed(seed)
    _della_keep_kernel[(P,)](
        base if base is not None else keep, x, order, keep, partial, float(c1), float(c2), k0, k1,
        n, L, inner, C, base_strides[0], base_strides[1], strides[0], strides[1],
        STREAM=stream, NORM=norm, HAS_BASE=base is not None, STRIDED=strided, BLOCK=BLOCK,
        num_warps=4, enable_fp_fusion=False,
    )
    if norm == abi.NORM_LINF:
        norms = partial.amax(dim=0)
    else:
        norms = partial.sum(dim=0)
        if norm == abi.NORM_L2:
            norms = norms.sqrt()
    return keep, norms
