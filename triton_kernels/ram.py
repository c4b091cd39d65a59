"""ram and ramplus_tl (C++: ``csrc/ram.cpp``; specs: ``fastmerge/methods/ram.py``,
``ramplus_tl.py``). With ``d_k = m_k - base``, ``nz_k = |d_k| > eps`` and ``c = sum_k nz_k``
(counted in fp32, exact)::

    ram:        out = base + (sum_k nz_k d_k) / max(c, 1)          (0 + nz_0 d_0 + ..., one division)
    ramplus_tl: out = base + sum_k (nz_k d_k) ([c = 1] lam_k + [c > 1] / c)

in the C++ kernel's operation order (IEEE divisions, no FMA contraction), so the bytes agree.
ramplus_tl's ``lam_k`` come from per-model counts over the whole tensor (``ram_counts``:
``shared_k = #(nz_k and c > 1)``, ``unique_k = #(nz_k and c = 1)``; per-program int32 partials
summed on the device in int64, exact in any order), computed on the host, then the merge pass.
Each pass reads every input once; the K deltas of a block stay in registers (fewer elements per
program as K grows). Flags ``[K + 1]`` (models, then base) in each pass, and the merge's result flag (a value
stored, after the rounding to the output dtype, is inf/nan). Flat 1-D grid, int64
indices.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, block_tile, store_checked


def block_size(K: int) -> int:
    return 1024 if K <= 4 else 512 if K <= 8 else 256 if K <= 16 else 128


@triton.jit
def _ram_block(base, models, flags, i, inb, eps, K: tl.constexpr):
    """The block's base, deltas (a tuple) and counts ``c`` (fp32), flags stored."""
    b = tl.load(base + i, mask=inb, other=0.0).to(tl.float32)
    tl.store(flags + K, 1, mask=tl.max(bad_bits(b), axis=0) > 0)
    c = tl.zeros(i.shape, tl.float32)
    ds = ()
    for k in tl.static_range(K):
        x = tl.load(models[k] + i, mask=inb, other=0.0).to(tl.float32)
        tl.store(flags + k, 1, mask=tl.max(bad_bits(x), axis=0) > 0)
        d = x - b
        c = c + (tl.abs(d) > eps).to(tl.float32)
        ds = ds + (d,)
    return b, ds, c


@triton.jit
def _ram_counts_kernel(base, models, flags, partial, n, eps, K: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    i, inb = block_tile(pid, n, BLK)
    b, ds, c = _ram_block(base, models, flags, i, inb, eps, K)
    for k in tl.static_range(K):
        nz = (tl.abs(ds[k]) > eps) & inb
        tl.store(partial + pid.to(tl.int64) * (2 * K) + 2 * k, tl.sum((nz & (c > 1.0)).to(tl.int32), axis=0))
        tl.store(partial + pid.to(tl.int64) * (2 * K) + 2 * k + 1,
                 tl.sum((nz & (c == 1.0)).to(tl.int32), axis=0))


@triton.jit
def _ram_merge_kernel(base, models, out, flags, n, eps, lam, K: tl.constexpr, PLUS: tl.constexpr,
                      BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    b, ds, c = _ram_block(base, models, flags, i, inb, eps, K)
    one = tl.full(i.shape, 1.0, tl.float32)
    cm = tl.maximum(c, 1.0)
    if PLUS:
        o = b
        inv = tl.math.div_rn(one, cm)
        for k in tl.static_range(K):
            d = ds[k]
            w = tl.where(c == 1.0, lam[k], inv)
            o = o + (d * (tl.abs(d) > eps).to(tl.float32)) * w
    else:
        o = tl.zeros(i.shape, tl.float32)
        for k in tl.static_range(K):
            d = ds[k]
            o = o + d * (tl.abs(d) > eps).to(tl.float32)
        o = b + tl.math.div_rn(o, cm)
    tl.store(flags + K + 1, 1, mask=store_checked(out + i, o, inb) > 0)


def ram_counts(base, models, *, n: int, eps: float):
    """Per-model counts ``[shared_0, unique_0, shared_1, ...]`` (int64), then the K + 1 flags,
    as one int64 device tensor (read it once)."""
    K = len(models)
    dev = base.device
    flags = torch.zeros(K + 1, dtype=torch.int32, device=dev)
    if n == 0:
        return torch.zeros(3 * K + 1, dtype=torch.int64, device=dev)
    BLK = block_size(K)
    grid = triton.cdiv(n, BLK)
    partial = torch.empty(grid, 2 * K, dtype=torch.int32, device=dev)
    _ram_counts_kernel[(grid,)](base, tuple(models), flags, partial, n, float(eps), K=K, BLK=BLK,
                                num_warps=4, enable_fp_fusion=False)
    return torch.cat([partial.sum(dim=0, dtype=torch.int64), flags.to(torch.int64)])


def ram_merge(base, models, out, *, n: int, eps: float, lam=()):
    """The merge pass into ``out`` (``lam`` empty: ram; one float per model: ramplus_tl).
    Returns the int32 device flags ``[K + 2]``: models, base, result (a stored value is inf/nan)."""
    K = len(models)
    flags = torch.zeros(K + 2, dtype=torch.int32, device=base.device)
    if n:
        BLK = block_size(K)
        plus = len(lam) > 0
        _ram_merge_kernel[(triton.cdiv(n, BLK),)](
            base, tuple(models), out, flags, n, float(eps),
            tuple(float(x) for x in lam) if plus else (0.0,), K=K, PLUS=plus, BLK=BLK,
            num_warps=4, enable_fp_fusion=False)
    return flags
