"""Device helpers shared by the Triton kernels: Philox4x32-10 in fastmerge's counter layout,
strided loads by logical index, magnitude keys and the top-set test.

Counter layout (see ``fastmerge/philox.py``, the contract every backend reproduces bit for bit):
element ``i`` of input slot ``stream`` uses word ``i & 3`` of Philox4x32-10 at counter
``(lo32(i >> 2), hi32(i >> 2), stream, 0)`` with key ``(lo32(seed), hi32(seed))``; its uniform
is ``(word >> 8) * 2**-24``. Kernels that stream over elements work on ``[G, 4]`` tiles (G
groups of four consecutive elements), so one Philox call serves four elements.

Inputs are addressed by *logical* (row-major) flat index ``i``. A tensor whose leading dims
collapse into one stride is read in place as ``(i // C) * s0 + (i % C) * s1`` with ``C`` its
last dimension (``STRIDED``); contiguous tensors use ``i`` directly.
"""
import triton
import triton.language as tl

from .. import abi

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
UNIFORM_SCALE = tl.constexpr(5.9604644775390625e-08)  # 2**-24

# mask kinds and norms: the codes of fastmerge/abi.py (MASK_BITS: here a precomputed uint8
# keep mask, one byte per element)
MASK_NONE = tl.constexpr(abi.MASK_NONE)
MASK_ZERO = tl.constexpr(abi.MASK_ZERO)
MASK_RANGE = tl.constexpr(abi.MASK_RANGE)
MASK_RANDOM = tl.constexpr(abi.MASK_RANDOM)
MASK_BITS = tl.constexpr(abi.MASK_BITS)
NORM_L2 = tl.constexpr(abi.NORM_L2)
NORM_LINF = tl.constexpr(abi.NORM_LINF)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors: ``(c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2),
    hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))`` ten times, the key bumped between rounds."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(a0, PHILOX_M0) ^ c3 ^ k1
        c1 = a2 * PHILOX_M1
        c3 = a0 * PHILOX_M0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def to_uniform(w):
    return (w >> 8).to(tl.float32) * UNIFORM_SCALE


@triton.jit
def seed_key(k0, k1):
    """The Philox key from the seed's two 32-bit halves (passed as signed int32 kernel args so
    one compiled kernel serves every seed)."""
    return k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True)


@triton.jit
def uniform_groups(g, stream, k0, k1, col):
    """Uniforms of the ``[H, VEC]`` tile of rows ``g`` (int64, ``[H]``) for input ``stream``,
    ``VEC = col.shape[1]`` a multiple of 4: row ``h`` holds the ``VEC // 4`` groups of four
    ``h * VEC // 4 + j``, one Philox call per group, word ``col % 4`` for column ``col``.
    ``VEC == 4`` is the plain ``[G, 4]`` tile (row = group)."""
    zero = tl.zeros(g.shape, tl.uint32)
    u = tl.zeros([g.shape[0], col.shape[1]], tl.float32)
    for j in tl.static_range(col.shape[1] // 4):
        gj = g * (col.shape[1] // 4) + j
        w0, w1, w2, w3 = philox4x32((gj & 0xFFFFFFFF).to(tl.uint32), (gj >> 32).to(tl.uint32),
                                    zero + stream, zero, k0, k1)
        u = tl.where(col == 4 * j, to_uniform(w0)[:, None], u)
        u = tl.where(col == 4 * j + 1, to_uniform(w1)[:, None], u)
        u = tl.where(col == 4 * j + 2, to_uniform(w2)[:, None], u)
        u = tl.where(col == 4 * j + 3, to_uniform(w3)[:, None], u)
    return u


@triton.jit
def uniform_at(i, stream, k0, k1):
    """Uniform of each element ``i`` (int64, any shape): one Philox call per element (for
    scattered indices, e.g. DELLA's rank order)."""
    g = i >> 2
    zero = tl.zeros(i.shape, tl.uint32)
    w0, w1, w2, w3 = philox4x32((g & 0xFFFFFFFF).to(tl.uint32), (g >> 32).to(tl.uint32),
                                zero + stream, zero, k0, k1)
    q = i & 3
    return to_uniform(tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3))))


@triton.jit
def offsets(i, C, s0, s1, STRIDED: tl.constexpr):
    """Memory offset (in elements) of logical flat index ``i``."""
    if STRIDED:
        r = i // C
        return r * s0 + (i - r * C) * s1
    else:
        return i


@triton.jit
def load_f32(ptr, i, mask, C, s0, s1, STRIDED: tl.constexpr):
    return tl.load(ptr + offsets(i, C, s0, s1, STRIDED), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def group_tile(n, G: tl.constexpr, VEC: tl.constexpr = 4):
    """This program's ``[4 G / VEC, VEC]`` tile of ``4 G`` consecutive elements: ``(pid, g, col,
    i, inb)`` with ``g`` the row index (int64; a row is ``VEC // 4`` groups of four, see
    :func:`uniform_groups`), ``col`` the column, ``i`` the flat indices and ``inb = i < n``.
    ``VEC`` consecutive elements per row let a thread issue one 16-byte access (8 for 2-byte
    types) when ``n`` is specialised (divisible by 16) and the pointers are aligned."""
    pid = tl.program_id(0).to(tl.int64)
    g = pid * (4 * G // VEC) + tl.arange(0, 4 * G // VEC).to(tl.int64)
    col = tl.arange(0, VEC)[None, :]
    i = g[:, None] * VEC + col
    return pid, g, col, i, i < n


def vec_width(element_size: int, G: int) -> int:
    """Elements per tile row (:func:`group_tile`): 16 bytes of 2-byte inputs when the tile
    gives every thread of a warp a full row, else 4 (16 bytes of fp32)."""
    return 8 if element_size <= 2 and 4 * G >= 8 * 32 else 4


def warps_for(G: int, vec: int) -> int:
    """Warps such that each thread owns one ``vec``-row of a ``4 G``-element tile: no element,
    and so no Philox group, is replicated across threads (one Philox call per group)."""
    return max(1, min(8, 4 * G // (vec * 32)))


@triton.jit
def block_tile(block, n, BLK: tl.constexpr):
    """Flat indices of block ``block`` (``BLK`` consecutive elements, int64) and ``i < n``."""
    i = block.to(tl.int64) * BLK + tl.arange(0, BLK).to(tl.int64)
    return i, i < n


@triton.jit
def load_base(base, i, mask, C, bs0, bs1, HAS_BASE: tl.constexpr, STRIDED: tl.constexpr):
    """The base at logical indices ``i`` in fp32 (zeros, never read, without a base)."""
    if HAS_BASE:
        b = load_f32(base, i, mask, C, bs0, bs1, STRIDED)
    else:
        b = tl.zeros(i.shape, tl.float32)
    return b


@triton.jit
def minus_base(x, b, i, mask, C, s0, s1, HAS_BASE: tl.constexpr, STRIDED: tl.constexpr):
    """fp32 ``x - b`` for a base ``b`` already loaded (``x`` alone without a base)."""
    d = load_f32(x, i, mask, C, s0, s1, STRIDED)
    if HAS_BASE:
        d = d - b
    return d


@triton.jit
def delta(x, base, i, mask, C, s0, s1, bs0, bs1, HAS_BASE: tl.constexpr, STRIDED: tl.constexpr):
    """fp32 ``x - base`` (``x`` alone without a base) at logical indices ``i``."""
    b = load_base(base, i, mask, C, bs0, bs1, HAS_BASE, STRIDED)
    return minus_base(x, b, i, mask, C, s0, s1, HAS_BASE, STRIDED)


@triton.jit
def flat_keep(d, i, g, col, m, KIND: tl.constexpr, thr, prob, key0, key1):
    """Keep decisions of model ``m``'s flat mask on its ``[G, 4]`` tile of deltas: a top-k range
    (thresholds ``thr[4m .. 4m+3]``) or DARE's Philox drop with keep probability ``prob``."""
    if KIND == MASK_RANGE:
        key = mag_key(d)
        keep = in_top(key, i, tl.load(thr + 4 * m), tl.load(thr + 4 * m + 1))
        keep = keep & ~in_top(key, i, tl.load(thr + 4 * m + 2), tl.load(thr + 4 * m + 3))
    else:
        keep = uniform_groups(g, m, key0, key1, col) < prob
    return keep


@triton.jit
def norm_terms(d, keep, NORM: tl.constexpr):
    """Per-element fp64 terms of a norm before and after masking (L1 and Linf: ``|d|``; L2: ``d**2``)."""
    v = d.to(tl.float64)
    if NORM == NORM_L2:
        v = v * v
    else:
        v = tl.abs(v)
    return v, tl.where(keep, v, 0.0)


@triton.jit
def norm_reduce(v, NORM: tl.constexpr):
    """A tile's partial norm: the max for Linf, the sum otherwise."""
    flat = tl.ravel(v)
    if NORM == NORM_LINF:
        r = tl.max(flat, axis=0)
    else:
        r = tl.sum(flat, axis=0)
    return r


@triton.jit
def nonfinite(x):
    """Whether any element of fp32 ``x`` is inf or nan (masked-off lanes load as 0)."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max((bits >= 0x7F800000).to(tl.int32)) > 0


@triton.jit
def mag_key(d):
    """31-bit key of ``|d|``: the fp32 bit pattern orders non-negative floats like the floats."""
    return d.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def in_top(key, i, T, J):
    """Membership of the top set ``key > T or (key == T and i <= J)`` (T, J int64 scalars)."""
    k = key.to(tl.int64)
    return (k > T) | ((k == T) & (i <= J))


@triton.jit
def bf16_bits(x):
    """The bf16 bits (in the low 16 bits of a uint32) of fp32 ``x`` rounded to nearest even,
    by hand: Triton's interpreter truncates bf16 casts, and the bit arithmetic gives the same
    result as the GPU's ``cvt.rn`` everywhere (NaN stays a quiet NaN)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(x != x, (u >> 16) | 0x40, r)


@triton.jit
def store_as(ptr, x, mask):
    """Store fp32 ``x`` rounded to nearest-even in ``ptr``'s element type (bf16: :func:`bf16_bits`)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, bf16_bits(x).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


def split_seed(seed: int):
    """The seed's two 32-bit halves as signed int32 values (one kernel signature for every seed)."""
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


# ---- mergekit's other methods (gram.py, lincomb.py, nearswap.py, ram.py, passthrough.py) ----

EXP_BITS = tl.constexpr(0x7F800000)


@triton.jit
def bad_bits(x):
    """1 where fp32 ``x`` is inf or nan (all-ones exponent), as int32: OR-able across a pass."""
    return ((x.to(tl.int32, bitcast=True) & EXP_BITS) == EXP_BITS).to(tl.int32)


@triton.jit
def store_checked(ptr, x, mask):
    """:func:`store_as`, returning 1 (int32) when a value stored is inf or nan *after* the
    rounding to ``ptr``'s dtype (an fp16/bf16 overflow counts), else 0."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = bf16_bits(x)
        tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        bad = ((bits & 0x7F80) == 0x7F80).to(tl.int32)
    elif ptr.dtype.element_ty == tl.float16:
        h = x.to(tl.float16)
        tl.store(ptr, h, mask=mask)
        bad = bad_bits(h.to(tl.float32))
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
        bad = bad_bits(x)
    return tl.max(tl.ravel(tl.where(mask, bad, 0)), axis=0)
