"""EMR-Merging's pass (spec: ``fastmerge.research.emr``, ``fastmerge/methods/emr.py``; C++:
``csrc/emr.cpp``). With ``d_k = m_k - base`` (fp32)::

    gamma = (0 + d_0 + d_1 + ...) > 0 ? 1 : -1,   m_k = d_k gamma > 0,
    uni   = gamma * max_k |d_k m_k|               (fp32, written),
    masks m_k packed as numpy.packbits packs a flat bool array (bit 7 the first element),
    sums  sum_j |d_k[j]| and sum_j |uni[j] m_k[j]| per model (float64),

one pass over base + K models, every fp32 operation the C++ kernel's in its order, so ``uni``
and the masks are the reference's bytes. The sums: each term is an fp32 value, exact in
float64; each program adds its block's terms in float64 (Triton's reduction tree) into a
``[programs, 2 K]`` partial, and the partials are summed over the programs in float64 on the
device (torch's sum). The reference (torch's float64 sum) adds the same exact terms in another
order: the sums agree to float64 round-off (a relative ``n * 2**-53`` at worst). Flags
``[K + 1]``: models, then base. Tiles and packing as ``consensus.py``; int64 indices.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits
from .consensus import _any, block_size, byte_tile, store_bits


@triton.jit
def _emr_kernel(base, models, uni, bits, partial, flags, n, row_bytes, K: tl.constexpr, R: tl.constexpr):
    pid = tl.program_id(0)
    r, col, i, inb = byte_tile(pid, n, R)
    row = partial + pid.to(tl.int64) * (2 * K)
    b = tl.load(base + i, mask=inb, other=0.0).to(tl.float32)
    tl.store(flags + K, 1, mask=_any(bad_bits(b)))
    g = tl.zeros(i.shape, tl.float32)
    ds = ()
    for k in tl.static_range(K):
        x = tl.load(models[k] + i, mask=inb, other=0.0).to(tl.float32)
        tl.store(flags + k, 1, mask=_any(bad_bits(x)))
        d = x - b
        g = g + d
        ds = ds + (d,)
        tl.store(row + k, tl.sum(tl.ravel(tl.abs(d).to(tl.float64)), axis=0))
    g = tl.where(g > 0.0, 1.0, -1.0)
    top = tl.zeros(i.shape, tl.float32)
    for k in tl.static_range(K):
        d = ds[k]
        a = tl.abs(d * (d * g > 0.0).to(tl.float32))
        top = tl.where(top < a, a, top)  # std::max(top, a)
    top = top * g
    tl.store(uni + i, top, mask=inb)
    for k in tl.static_range(K):
        keep = ds[k] * g > 0.0
        kept = top * keep.to(tl.float32)
        tl.store(row + K + k, tl.sum(tl.ravel(tl.abs(kept).to(tl.float64)), axis=0))
        store_bits(bits[k], keep & inb, r, col, row_bytes)


def emr(base, models, uni, bits, *, n: int):
    """EMR's pass over contiguous ``base`` and ``models``: ``uni`` (fp32 ``[n]``) and ``bits``
    (uint8 ``[K, ceil(n / 8)]``) written; returns one float64 device tensor (read it once):
    ``sum |d_k|`` per model, ``sum |uni m_k|`` per model, then the K + 1 flags."""
    K = len(models)
    dev = base.device
    flags = torch.zeros(K + 1, dtype=torch.int32, device=dev)
    if n == 0:
        return torch.cat([torch.zeros(2 * K, dtype=torch.float64, device=dev), flags.to(torch.float64)])
    BLK = block_size(K, False)
    grid = triton.cdiv(n, BLK)
    partial = torch.empty(grid, 2 * K, dtype=torch.float64, device=dev)
    _emr_kernel[(grid,)](base, tuple(models), uni, tuple(bits), partial, flags, n, (n + 7) // 8, K=K, R=BLK // 8,
                         num_warps=4, enable_fp_fusion=False)
    return torch.cat([partial.sum(dim=0), flags.to(torch.float64)])
