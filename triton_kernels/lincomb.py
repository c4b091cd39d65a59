"""The elementwise pass of mergekit's other methods (C++: ``csrc/lincomb.cpp``):
``out = sum_k c_k x_k + c_b base`` (or of the deltas ``x_k - base`` with ``DELTA``), one
coefficient per input and vector, fp32 math in input order (``c_0 x_0``, then ``+ c_k x_k``,
then ``+ c_b base`` whenever a base is given), every multiply and add rounded separately (no
FMA contraction), rounded once to the output dtype: the bytes of the C++ kernel.

Layout: the contiguous inputs as a 2-D view ``[R, C]``. Vectors along rows (``inner == 1``:
the whole tensor or each last-dim row): ``R = outer``, ``C = length``, the vector of row ``r``
is ``r``. Vectors along dim 0 (``inner > 1``): ``R = outer * length``, ``C = inner``, the
vector of ``(r, c)`` is ``(r // length) * inner + c``. A program owns a ``[BR, BC]`` tile
(1024 elements), so the vector index costs one division per row, not per element; programs
are a 1-D grid (axis 0 only, no 65535 limit); indices are int64.

Coefficients: K fp32 scalar arguments when there is one vector (no device copy), else a fp32
device tensor ``[K + 1, nvec]`` (row K: the base's). Non-finite inputs are flagged per input
in the same pass, and so is a non-finite result as stored (after the rounding to the output
dtype): int32 ``[K + 2]``, inputs, base, result.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, store_checked

TILE = 1024


@triton.jit
def _coef(cf, cs, k: tl.constexpr, vrow, vcol, nvec, length, inner, mask,
          SCALAR: tl.constexpr, COLS: tl.constexpr):
    """Coefficient row ``k`` for the tile: a scalar argument, or per vector from ``cf``."""
    if SCALAR:
        c = cs[k]
    else:
        if COLS:
            v = (vrow // length)[:, None] * inner + vcol[None, :]
            c = tl.load(cf + k * nvec + v, mask=mask, other=0.0)
        else:
            c = tl.load(cf + k * nvec + vrow, mask=vrow < nvec, other=0.0)[:, None]
    return c


@triton.jit
def _lincomb_kernel(base, xs, out, flags, cf, cs, cb, R, C, nvec, length, inner, ncb,
                    K: tl.constexpr, HAS_BASE: tl.constexpr, DELTA: tl.constexpr,
                    SCALAR: tl.constexpr, COLS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rb = pid // ncb
    row = rb * BR + tl.arange(0, BR).to(tl.int64)
    col = (pid - rb * ncb) * BC + tl.arange(0, BC).to(tl.int64)
    mask = (row < R)[:, None] & (col < C)[None, :]
    off = row[:, None] * C + col[None, :]
    b = tl.zeros((BR, BC), tl.float32)
    if HAS_BASE:
        b = tl.load(base + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(flags + K, 1, mask=tl.max(tl.ravel(bad_bits(b)), axis=0) > 0)
    r = tl.zeros((BR, BC), tl.float32)
    for k in tl.static_range(K):
        x = tl.load(xs[k] + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(flags + k, 1, mask=tl.max(tl.ravel(bad_bits(x)), axis=0) > 0)
        if DELTA:
            x = x - b
        c = _coef(cf, cs, k, row, col, nvec, length, inner, mask, SCALAR, COLS)
        if k == 0:
            r = c * x
        else:
            r = r + c * x
    if HAS_BASE:
        if SCALAR:
            r = r + cb * b
        else:
            r = r + _coef(cf, cs, K, row, col, nvec, length, inner, mask, SCALAR, COLS) * b
    tl.store(flags + K + 1, 1, mask=store_checked(out + off, r, mask) > 0)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def lincomb(base, xs, out, *, outer: int, length: int, inner: int, coef=None, scalars=None,
            base_scalar: float = 0.0, delta: bool = False):
    """Launch the pass into ``out`` (contiguous, of the inputs' shape; inputs contiguous).
    ``scalars``: K Python floats (one vector), with ``base_scalar``; else ``coef``, the fp32
    device tensor ``[K + 1, outer * inner]``. Returns the int32 device flags ``[K + 2]``: inputs,
    base, then the result (a stored value is inf/nan, after the rounding to ``out``'s dtype)."""
    K = len(xs)
    dev = xs[0].device
    flags = torch.zeros(K + 2, dtype=torch.int32, device=dev)
    n = outer * length * inner
    if n == 0 or K == 0:
        return flags
    cols = inner > 1
    R, C = (outer * length, inner) if cols else (outer, length)
    BC = min(TILE, _pow2(C))
    BR = max(1, TILE // BC)
    ncb = triton.cdiv(C, BC)
    scalar = scalars is not None
    _lincomb_kernel[(triton.cdiv(R, BR) * ncb,)](
        base if base is not None else flags, tuple(xs), out, flags,
        flags if scalar else coef, tuple(float(c) for c in scalars) if scalar else (0.0,),
        float(base_scalar), R, C, outer * inner, length, inner, ncb,
        K=K, HAS_BASE=base is not None, DELTA=bool(delta and base is not None), SCALAR=scalar,
        COLS=cols, BR=BR, BC=BC, num_warps=4, enable_fp_fusion=False)
    return flags
