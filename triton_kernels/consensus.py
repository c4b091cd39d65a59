"""consensus_ta, consensus_ties and TALL masks (specs: ``fastmerge/methods/consensus_ta.py``,
``consensus_ties.py``, ``fastmerge.research.tall_masks``; C++: ``csrc/consensus.cpp``). With
``d_k = m_k - base`` (fp32) and a multi-task vector ``v``::

    v     = 0 + d_0 + d_1 + ...                                   (TA)
          | the given ``mtl`` (fp32 of its dtype)                   (TALL masks against mtl)
          | TIES: t_k = d_k [in top set k], s = 0 + t_0 + ...,
            a_k = (s >= 0 ? t_k > 0 : t_k < 0), v = 0 + t_0 a_0 + ... (normalize: / max(sum a_k, 1))
    m_k   = |d_k| > lambda_k |v - d_k|                            (the TALL masks)
    out   = base + lam (v [sum_k m_k >= kmin])

every operation the C++ kernel's, in its order (no FMA contraction, IEEE division), so the
result and the masks are the reference's bytes. Top set k: ``key > T_k or (key == T_k and
i <= J_k)`` with ``key`` the 31-bit pattern of ``|d_k|`` and ``(T_k, J_k)`` from
``magnitude_select`` (``cuts``, int64 ``[K, 2]`` on the device; ``T = -1``: all, ``T = 2**32``:
none). The masks are packed as ``numpy.packbits`` packs a flat bool array: each program works
on a ``[R, 8]`` tile (row ``r`` = byte ``r`` of every mask, bit 7 the first element) and writes
model k's bytes at ``bits[k] + r`` (the K rows passed as K pointers: no 32-bit
``k * ceil(n / 8)`` product). Flags ``[K + 3]``: models, base, mtl, then the
result as stored (after the rounding to the output dtype). int64 indices.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, in_top, mag_key, store_checked

MODE_TA = tl.constexpr(0)
MODE_TIES = tl.constexpr(1)
MODE_MTL = tl.constexpr(2)


def block_size(K: int, ties: bool) -> int:
    """Elements per program (a multiple of 8: whole mask bytes); TIES keeps 2 K values live."""
    live = 2 * K if ties else K
    return 1024 if live <= 4 else 512 if live <= 8 else 256 if live <= 16 else 128


@triton.jit
def byte_tile(pid, n, R: tl.constexpr):
    """Program ``pid``'s ``[R, 8]`` tile: ``(r, col, i, inb)``: byte rows ``r`` (int64, ``[R]``),
    bit columns ``col`` (``[1, 8]``), flat indices ``i = 8 r + col`` and ``i < n``."""
    r = pid.to(tl.int64) * R + tl.arange(0, R).to(tl.int64)
    col = tl.arange(0, 8)[None, :]
    i = r[:, None] * 8 + col
    return r, col, i, i < n


@triton.jit
def store_bits(ptr, m, r, col, row_bytes):
    """The bytes of the bool tile ``m`` (``[R, 8]``, False off the tensor) at ``ptr + r`` (one
    mask's row of bytes): element ``8 r + col`` in bit ``7 - col``."""
    byte = tl.sum(m.to(tl.int32) << (7 - col), axis=1)
    tl.store(ptr + r, byte.to(tl.uint8), mask=r < row_bytes)


@triton.jit
def _any(bad):
    return tl.max(tl.ravel(bad), axis=0) > 0


@triton.jit
def _consensus_kernel(base, models, mtl, cuts, out, bits, flags, n, row_bytes, lambdas, kmin, lam,
                      K: tl.constexpr, MODE: tl.constexpr, NORMALIZE: tl.constexpr,
                      WRITE_OUT: tl.constexpr, WRITE_BITS: tl.constexpr, R: tl.constexpr):
    r, col, i, inb = byte_tile(tl.program_id(0), n, R)
    b = tl.load(base + i, mask=inb, other=0.0).to(tl.float32)
    tl.store(flags + K, 1, mask=_any(bad_bits(b)))
    ds = ()
    for k in tl.static_range(K):
        x = tl.load(models[k] + i, mask=inb, other=0.0).to(tl.float32)
        tl.store(flags + k, 1, mask=_any(bad_bits(x)))
        ds = ds + (x - b,)
    if MODE == MODE_MTL:
        v = tl.load(mtl + i, mask=inb, other=0.0).to(tl.float32)
        tl.store(flags + K + 1, 1, mask=_any(bad_bits(v)))
    elif MODE == MODE_TA:  # Python's sum: 0 + d_0 + d_1 + ...
        v = tl.zeros(i.shape, tl.float32)
        for k in tl.static_range(K):
            v = v + ds[k]
    else:
        s = tl.zeros(i.shape, tl.float32)
        ts = ()
        for k in tl.static_range(K):
            d = ds[k]
            t = d * in_top(mag_key(d), i, tl.load(cuts + 2 * k), tl.load(cuts + 2 * k + 1)).to(tl.float32)
            ts = ts + (t,)
            s = s + t
        v = tl.zeros(i.shape, tl.float32)
        c = tl.zeros(i.shape, tl.float32)
        for k in tl.static_range(K):
            t = ts[k]
            agree = tl.where(s >= 0.0, t > 0.0, t < 0.0).to(tl.float32)
            v = v + t * agree
            c = c + agree
        if NORMALIZE:
            v = tl.math.div_rn(v, tl.where(c < 1.0, 1.0, c))
    count = tl.zeros(i.shape, tl.float32)
    for k in tl.static_range(K):
        d = ds[k]
        m = tl.abs(d) > lambdas[k] * tl.abs(v - d)
        count = count + m.to(tl.float32)
        if WRITE_BITS:
            store_bits(bits[k], m & inb, r, col, row_bytes)
    if WRITE_OUT:
        o = b + lam * (v * (count >= kmin).to(tl.float32))
        tl.store(flags + K + 2, 1, mask=store_checked(out + i, o, inb) > 0)


def consensus(base, models, *, n: int, lambdas, kmin: float, lam: float, out=None, bits=None,
              mtl=None, cuts=None, normalize: bool = False):
    """One pass over contiguous ``base`` and ``models`` (and ``mtl``): the merge into ``out``
    and/or the packed masks into ``bits`` (uint8 ``[K, ceil(n / 8)]``, zeroed). ``cuts``: the
    TIES top sets (int64 device ``[K, 2]``; None: TA, or ``mtl`` when given). ``kmin``: the
    consensus count as a float. Returns the int32 device flags ``[K + 3]``: models, base,
    mtl, result."""
    K = len(models)
    dev = base.device
    flags = torch.zeros(K + 3, dtype=torch.int32, device=dev)
    if n == 0:
        return flags
    mode = 2 if mtl is not None else 1 if cuts is not None else 0
    BLK = block_size(K, mode == 1)
    _consensus_kernel[(triton.cdiv(n, BLK),)](
        base, tuple(models), mtl if mtl is not None else flags, cuts if cuts is not None else flags,
        out if out is not None else flags, tuple(bits) if bits is not None else (flags,) * K, flags, n, (n + 7) // 8,
        tuple(float(x) for x in lambdas), float(kmin), float(lam), K=K, MODE=mode, NORMALIZE=bool(normalize),
        WRITE_OUT=out is not None, WRITE_BITS=bits is not None, R=BLK // 8, num_warps=4,
        enable_fp_fusion=False)
    return flags
