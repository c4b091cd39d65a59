"""Fisher merging (spec: ``fastmerge.research.fisher``; C++: ``csrc/fisher.cpp``), K models
``theta_k`` and K diagonal Fishers ``F_k`` (each list of one dtype, read in place)::

    sum_squares: sum_j F_k[j]^2 per Fisher (float64),
    merge:       out = (0 + w_0 theta_0 + ...) / (0 + w_0 + ...),  w_k = c_k (F_k + eps)  (fp32)

``fisher_sumsq``: each square is of an fp32 value, exact in float64; each program adds its
block's squares in float64 (Triton's reduction tree) into a ``[programs, K]`` partial, summed
over the programs in float64 on the device (torch's sum): the reference's float64 sum of the
same exact terms in another order, so they agree to float64 round-off. Flags ``[2 K]``: per
Fisher inf/nan, then per Fisher a negative entry (``-0`` is not). ``fisher_merge``: every fp32
operation the C++ kernel's and the reference's, in their order (no FMA contraction, IEEE
division): the reference's bytes. Flags ``[3 K + 1]``: models (inf/nan), Fishers (inf/nan),
Fishers (negative), the result as stored. Flat 1-D grids, int64 indices.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, block_tile, store_checked


def block_size(K: int) -> int:
    return 1024 if K <= 4 else 512 if K <= 8 else 256 if K <= 16 else 128


@triton.jit
def _fisher_load(fishers, flags, i, inb, k, K: tl.constexpr):
    """Fisher ``k``'s block in fp32, its inf/nan (flags k) and negative (flags K + k) flags set."""
    f = tl.load(fishers[k] + i, mask=inb, other=0.0).to(tl.float32)
    tl.store(flags + k, 1, mask=tl.max(bad_bits(f), axis=0) > 0)
    tl.store(flags + K + k, 1, mask=tl.max((f < 0.0).to(tl.int32), axis=0) > 0)
    return f


@triton.jit
def _fisher_sumsq_kernel(fishers, partial, flags, n, K: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    i, inb = block_tile(pid, n, BLK)
    for k in tl.static_range(K):
        f = _fisher_load(fishers, flags, i, inb, k, K).to(tl.float64)
        tl.store(partial + pid.to(tl.int64) * K + k, tl.sum(f * f, axis=0))


@triton.jit
def _fisher_merge_kernel(models, fishers, out, flags, n, coef, eps, K: tl.constexpr, BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    num = tl.zeros(i.shape, tl.float32)
    den = tl.zeros(i.shape, tl.float32)
    for k in tl.static_range(K):
        f = _fisher_load(fishers, flags + K, i, inb, k, K)
        x = tl.load(models[k] + i, mask=inb, other=0.0).to(tl.float32)
        tl.store(flags + k, 1, mask=tl.max(bad_bits(x), axis=0) > 0)
        cw = coef[k] * (f + eps)
        num = num + cw * x
        den = den + cw
    o = tl.math.div_rn(num, tl.where(inb, den, 1.0))
    tl.store(flags + 3 * K, 1, mask=store_checked(out + i, o, inb) > 0)


def fisher_sumsq(fishers, *, n: int):
    """One float64 device tensor (read it once): ``sum F_k^2`` per Fisher, then the ``2 K``
    flags (inf/nan per Fisher, negative per Fisher)."""
    K = len(fishers)
    dev = fishers[0].device
    flags = torch.zeros(2 * K, dtype=torch.int32, device=dev)
    if n == 0:
        return torch.cat([torch.zeros(K, dtype=torch.float64, device=dev), flags.to(torch.float64)])
    BLK = block_size(K)
    grid = triton.cdiv(n, BLK)
    partial = torch.empty(grid, K, dtype=torch.float64, device=dev)
    _fisher_sumsq_kernel[(grid,)](tuple(fishers), partial, flags, n, K=K, BLK=BLK, num_warps=4,
                                  enable_fp_fusion=False)
    return torch.cat([partial.sum(dim=0), flags.to(torch.float64)])


def fisher_merge(models, fishers, out, *, n: int, coef, eps: float):
    """The merge pass into ``out`` with the fp32 coefficients ``coef``; returns the int32 device
    flags ``[3 K + 1]``: models, Fishers (inf/nan), Fishers (negative), result."""
    K = len(models)
    flags = torch.zeros(3 * K + 1, dtype=torch.int32, device=models[0].device)
    if n:
        BLK = block_size(K)
        _fisher_merge_kernel[(triton.cdiv(n, BLK),)](
            tuple(models), tuple(fishers), out, flags, n, tuple(float(c) for c in coef), float(eps), K=K,
            BLK=BLK, num_warps=4, enable_fp_fusion=False)
    return flags
