"""sce (spec: ``fastmerge/methods/sce.py``; C++: ``csrc/sce.cpp`` on issue17-sce-arcee), with
``d_k = m_k - base`` (fp32)::

    select: keep the k = int(nonzero * select_topk) elements of largest var_k(d_k) (population
            variance as torch's CPU kernel computes it: Welford in double in model order, m2 / K
            rounded to fp32), ties to the lowest index;
    weights (host): w_k = mean(d_k^2 keep) / sum_j (...), from the float64 sums of this pass;
    merge:  out = base + sum_k d_k kw_k / max(sum_k kw_k, 1e-6), kw_k = [sign d_k = elected] w_k,
            elected = sign of 0 + d_0 + d_1 + ... (>= 0: +1), every operation in the C++ order.

Passes on the GPU: with ``0 < select_topk < 1`` one pass writes the variances (fp32, one per
element) and counts the nonzero ones, ``magnitude_select.select`` finds the exact top-k
threshold ``(T, J)`` on those (its ties rule is the lowest index), then the energy pass and the
merge pass read ``var`` and test ``var > T or (var == T and i <= J)``; otherwise only the energy
and merge passes run. Energies are per-program float64 partials (tree order, then torch's sum:
not the C++ order, a few float64 ulps apart before the fp32 rounding of ``sum / n``). Every
pass flags inf/nan per input (models, then base); the merge pass also flags a result that is
inf/nan as stored. Flat 1-D grids, int64 indices.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, block_tile, in_top, mag_key, store_checked

MODE_ALL = tl.constexpr(0)
MODE_BITS = tl.constexpr(1)
MODE_NONE = tl.constexpr(2)


def block_size(K: int) -> int:
    return 1024 if K <= 4 else 512 if K <= 8 else 256 if K <= 16 else 128


@triton.jit
def _sce_deltas(base, models, flags, i, inb, K: tl.constexpr):
    b = tl.load(base + i, mask=inb, other=0.0).to(tl.float32)
    tl.store(flags + K, 1, mask=tl.max(bad_bits(b), axis=0) > 0)
    ds = ()
    for k in tl.static_range(K):
        x = tl.load(models[k] + i, mask=inb, other=0.0).to(tl.float32)
        tl.store(flags + k, 1, mask=tl.max(bad_bits(x), axis=0) > 0)
        ds = ds + (x - b,)
    return b, ds


@triton.jit
def _keep(var, thr, i, inb, MODE: tl.constexpr):
    """fp32 1/0 keep of the block (MODE_BITS: the top-k of var by (T, J) in ``thr``)."""
    if MODE == MODE_BITS:
        v = tl.load(var + i, mask=inb, other=0.0)
        keep = in_top(mag_key(v), i, tl.load(thr), tl.load(thr + 1)).to(tl.float32)
    elif MODE == MODE_NONE:
        keep = tl.zeros(i.shape, tl.float32)
    else:
        keep = tl.full(i.shape, 1.0, tl.float32)
    return keep


@triton.jit
def _sce_var_kernel(base, models, var, flags, nonzero, n, K: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    i, inb = block_tile(pid, n, BLK)
    b, ds = _sce_deltas(base, models, flags, i, inb, K)
    mean = ds[0].to(tl.float64)
    m2 = tl.zeros(i.shape, tl.float64)
    for k in tl.static_range(1, K):
        x = ds[k].to(tl.float64)
        delta = x - mean
        nm = mean + delta / (k + 1.0)  # float64 division: IEEE (div.rn.f64), unlike fp32 '/'
        m2 = m2 + delta * (x - nm)
        mean = nm
    v = (m2 / (K * 1.0)).to(tl.float32)
    tl.store(var + i, v, mask=inb)
    tl.store(nonzero + pid, tl.sum(((v != 0.0) & inb).to(tl.int32), axis=0))


@triton.jit
def _sce_energy_kernel(base, models, var, thr, flags, partial, n, K: tl.constexpr,
                       MODE: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    i, inb = block_tile(pid, n, BLK)
    b, ds = _sce_deltas(base, models, flags, i, inb, K)
    keep = _keep(var, thr, i, inb, MODE)
    for k in tl.static_range(K):
        d = ds[k]
        if MODE != MODE_ALL:
            d = d * keep
        tl.store(partial + pid.to(tl.int64) * K + k, tl.sum((d * d).to(tl.float64), axis=0))


@triton.jit
def _sce_merge_kernel(base, models, out, var, thr, flags, n, w, K: tl.constexpr, MODE: tl.constexpr,
                      BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    b, ds = _sce_deltas(base, models, flags, i, inb, K)
    keep = _keep(var, thr, i, inb, MODE)
    if MODE != MODE_ALL:
        kept = ()
        for k in tl.static_range(K):
            kept = kept + (ds[k] * keep,)
        ds = kept
    total = tl.zeros(i.shape, tl.float32)
    for k in tl.static_range(K):  # Python's sum(deltas): 0 + d_0 + d_1 + ...
        total = total + ds[k]
    mg = tl.zeros(i.shape, tl.float32)
    den = tl.zeros(i.shape, tl.float32)
    for k in tl.static_range(K):
        d = ds[k]
        agree = tl.where(total >= 0.0, d > 0.0, d < 0.0)
        kw = tl.where(agree, w[k], 0.0)
        mg = mg + d * kw
        den = den + kw
    dn = tl.where(den < 1e-6, 1e-6, den)
    tl.store(flags + K + 1, 1, mask=store_checked(out + i, b + tl.math.div_rn(mg, dn), inb) > 0)


def _launch(n, K):
    BLK = block_size(K)
    return BLK, triton.cdiv(n, BLK)


def sce_variance(base, models, *, n: int):
    """``(var, res)``: the fp32 device variances ``[n]`` and one int64 device tensor: the count
    of nonzero variances, then the K + 1 flags (read it once)."""
    K = len(models)
    dev = base.device
    BLK, grid = _launch(n, K)
    var = torch.empty(n, dtype=torch.float32, device=dev)
    flags = torch.zeros(K + 1, dtype=torch.int32, device=dev)
    nonzero = torch.empty(grid, dtype=torch.int32, device=dev)
    _sce_var_kernel[(grid,)](base, tuple(models), var, flags, nonzero, n, K=K, BLK=BLK, num_warps=4,
                             enable_fp_fusion=False)
    return var, torch.cat([nonzero.sum(dtype=torch.int64).reshape(1), flags.to(torch.int64)])


def sce_energy(base, models, *, n: int, mode: int, var=None, thr=None):
    """One float64 device tensor: ``sum_i (d_k keep)^2`` per model, then the K + 1 flags."""
    K = len(models)
    dev = base.device
    BLK, grid = _launch(n, K)
    flags = torch.zeros(K + 1, dtype=torch.int32, device=dev)
    partial = torch.empty(grid, K, dtype=torch.float64, device=dev)
    _sce_energy_kernel[(grid,)](base, tuple(models), var if var is not None else flags,
                                thr if thr is not None else flags, flags, partial, n, K=K, MODE=mode,
                                BLK=BLK, num_warps=4, enable_fp_fusion=False)
    return torch.cat([partial.sum(dim=0), flags.to(torch.float64)])


def sce_merge(base, models, out, *, n: int, w, mode: int, var=None, thr=None):
    """The merge pass into ``out`` with the fp32 weights ``w``; returns the int32 device flags
    ``[K + 2]``: models, base, result (a stored value is inf/nan)."""
    K = len(models)
    BLK, grid = _launch(n, K)
    flags = torch.zeros(K + 2, dtype=torch.int32, device=base.device)
    _sce_merge_kernel[(grid,)](base, tuple(models), out, var if var is not None else flags,
                               thr if thr is not None else flags, flags, n, tuple(float(x) for x in w),
                               K=K, MODE=mode, BLK=BLK, num_warps=4, enable_fp_fusion=False)
    return flags
