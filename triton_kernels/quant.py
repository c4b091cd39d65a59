"""Quantizers: INT4 (GPTQ v1, torchao plain) and FP8 (per tensor, row, block), and the fused
merge->INT4 pass. The formats are defined by ``fastmerge/reference.py`` (the torch reference);
every step here is the same fp32 operation in the same order, so the outputs agree bit for bit:

* divisions are ``div_rn`` (IEEE, not the approximate default) and the launch disables FMA
  contraction;
* round half to even is ``(x + 1.5 * 2**23) - 1.5 * 2**23`` on values clamped to
  ``|x| <= 64`` first (the result is clamped to the code range afterwards, so the early clamp
  changes nothing);
* fp32 -> fp16 is the hardware's round-to-nearest-even conversion, fp32 -> bf16 is rounded by
  hand (``_common.bf16_bits``; the interpreter truncates bf16 casts), and the FP8 codes are
  encoded by hand with integer arithmetic (round to nearest even, subnormals included), so no
  cast of Triton's is trusted with a rounding mode.

INT4 works on tiles of ``R`` rows by one group of ``GS`` columns: the group statistics are row
reductions of the tile and the packed words are reductions of the tile reshaped in eights
(GPTQ ``qweight`` along ``in``, ``qzeros`` along ``out``) or pairs (torchao ``qdata``). The
fused kernel builds the same tile from the merge (``fused_merge.merge_tile``) instead of a
load, rounds it to the merge's output dtype and quantizes it: the merged tensor is never
written. FP8 per row / per block runs one program per scale cell, which reads its cell twice
(amax, then codes; the second read hits the cache); per tensor takes an amax pass first.
"""
import torch
import triton
import triton.language as tl

from fastmerge.formats import fp8_scale_shape, int4_outputs

from .. import abi
from ._common import bf16_bits, nonfinite, seed_key, store_as
from .fused_merge import groups_per_program, launch_args, merge_tile

RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
FP16_TINY = tl.constexpr(5.9604644775390625e-08)  # 2**-24, the smallest fp16 subnormal
FP32_EPS = tl.constexpr(1.1920928955078125e-07)
# codes (fastmerge/abi.py): the INT4 layout, and the dtype values are rounded to
QUANT_INT4_GPTQ = tl.constexpr(abi.QUANT_INT4_GPTQ)
DTYPE_F16 = tl.constexpr(abi.DTYPE_F16)
DTYPE_BF16 = tl.constexpr(abi.DTYPE_BF16)
FP8 = {torch.float8_e4m3fn: (3, 7, 448.0), torch.float8_e5m2: (2, 15, 57344.0)}  # mantissa bits, bias, max
INT4_ELEMS = 2048  # values per program of the standalone INT4 kernel
TENSOR_CELL = 16384  # values per program of the per-tensor FP8 passes


@triton.jit
def rne(x):
    """Round half to even of fp32 ``x`` with ``|x| <= 2**22``."""
    return (x + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in dtype ``DT`` (a ``DTYPE_*`` code; fp32: unchanged),
    as fp32."""
    if DT == DTYPE_BF16:
        x = (bf16_bits(x) << 16).to(tl.float32, bitcast=True)
    elif DT == DTYPE_F16:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def half_scale(s, flags, FLAG: tl.constexpr, valid):
    """GPTQ's scale as stored (fp16, 0 -> 2**-24) as fp32; an fp16 overflow sets ``flags[FLAG]``."""
    h = s.to(tl.float16).to(tl.float32)
    tl.store(flags + FLAG, 1, mask=tl.max((valid & (h == float("inf"))).to(tl.int32)) > 0)
    return tl.where(h == 0.0, FP16_TINY, h)


@triton.jit
def pack_nibbles(q, R: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    """int32 codes ``[R, M * N]`` -> ``[R, M]``: code ``j`` of each ``N`` at bits ``4 j``."""
    c = tl.reshape(q & 0xF, [R, M, N])
    sh = (tl.arange(0, N) * 4)[None, None, :]
    return tl.sum((c << sh).to(tl.uint32, bitcast=True), axis=2).to(tl.int32, bitcast=True)


@triton.jit
def int4_tile(x, rows, rmask, grp, q0, q1, q2, flags, FLAG: tl.constexpr, OUT, IN,
              R: tl.constexpr, GS: tl.constexpr, LAYOUT: tl.constexpr, SYM: tl.constexpr):
    """Quantize the fp32 tile ``x [R, GS]`` (rows ``rows``, group ``grp``) and store it in the
    layout's tensors ``q0, q1, q2`` (GPTQ: qweight, qzeros, scales; torchao: qdata, scale,
    zero_point). Rows past ``OUT`` (``~rmask``) are computed and not stored."""
    mn = tl.min(x, axis=1)
    mx = tl.max(x, axis=1)
    srow = grp.to(tl.int64) * OUT + rows  # [in/GS, out] tensors
    if LAYOUT == QUANT_INT4_GPTQ:
        if SYM:
            amax = tl.maximum(tl.abs(mn), tl.abs(mx))
            amax = tl.where(amax == 0.0, 1.0, amax)
            s = half_scale(tl.math.div_rn(amax + amax, 15.0 + tl.zeros_like(amax)), flags, FLAG, rmask)
            z = 8.0 + tl.zeros_like(s)
        else:
            lo = tl.minimum(mn, 0.0)
            hi = tl.maximum(mx, 0.0)
            both = lo == hi  # an all-zero group: GPTQ's [-1, 1]
            lo = tl.where(both, -1.0, lo)
            hi = tl.where(both, 1.0, hi)
            s = half_scale(tl.math.div_rn(hi - lo, 15.0 + tl.zeros_like(hi)), flags, FLAG, rmask)
            z = tl.minimum(rne(tl.minimum(tl.math.div_rn(-lo, s), 64.0)), 15.0)
            z0 = z == 0.0  # v1 stores zero - 1: take (max / 14, 1) instead
            s = tl.where(z0, half_scale(tl.math.div_rn(hi, 14.0 + tl.zeros_like(hi)), flags, FLAG,
                                        rmask & z0), s)
            z = tl.where(z0, 1.0, z)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, s[:, None] + tl.zeros_like(x)), -64.0), 64.0)
        q = tl.minimum(tl.maximum(rne(v) + z[:, None], 0.0), 15.0).to(tl.int32)
        # qweight [in/8, out]: eight consecutive codes along in per word
        words = pack_nibbles(q, R, GS // 8, 8)
        j = tl.arange(0, GS // 8)
        tl.store(q0 + (grp.to(tl.int64) * (GS // 8) + j[None, :]) * OUT + rows[:, None], words,
                 mask=rmask[:, None])
        # qzeros [in/GS, out/8]: zero - 1 of eight consecutive rows per word
        zw = pack_nibbles(tl.reshape(z.to(tl.int32) - 1, [1, R]), 1, R // 8, 8)
        zr = (tl.min(rows, axis=0) // 8 + tl.arange(0, R // 8))[None, :]
        tl.store(q1 + grp.to(tl.int64) * (OUT // 8) + zr, zw, mask=zr * 8 < OUT)
        tl.store(q2 + srow, s.to(tl.float16), mask=rmask)
    else:
        if SYM:
            sc = tl.math.div_rn(tl.maximum(tl.maximum(tl.abs(mn), tl.abs(mx)), 1e-6),
                                8.0 + tl.zeros_like(mn))
            v = tl.math.div_rn(x, sc[:, None] + tl.zeros_like(x))
            q = tl.minimum(tl.maximum(rne(tl.minimum(tl.maximum(v, -64.0), 64.0)), -8.0), 7.0)
            zero = tl.zeros_like(sc)
        else:
            sc = tl.math.div_rn(tl.maximum(mx - mn, 1e-6), 15.0 + tl.zeros_like(mn))
            zero = mn + sc * 8.0
            v = tl.math.div_rn(x - mn[:, None], sc[:, None] + tl.zeros_like(x))
            q = tl.minimum(tl.maximum(rne(tl.minimum(v, 64.0)), 0.0), 15.0) - 8.0
        # qdata [out, in/2] int8: the even element in the low nibble
        pairs = pack_nibbles(q.to(tl.int32), R, GS // 2, 2).to(tl.int8)
        j = tl.arange(0, GS // 2)
        tl.store(q0 + rows[:, None] * (IN // 2) + grp.to(tl.int64) * (GS // 2) + j[None, :], pairs,
                 mask=rmask[:, None])
        store_as(q1 + srow, sc, rmask)
        store_as(q2 + srow, zero, rmask)


@triton.jit
def _int4_kernel(w, q0, q1, q2, flags, OUT, IN, R: tl.constexpr, GS: tl.constexpr,
                 LAYOUT: tl.constexpr, SYM: tl.constexpr):
    # one grid dimension (x, up to 2**31 - 1 programs): the group count on grid.y would stop
    # launching past 65,535 groups; the groups of a row tile are consecutive programs
    ngrp = IN // GS
    grp = tl.program_id(0) % ngrp
    rows = (tl.program_id(0) // ngrp).to(tl.int64) * R + tl.arange(0, R)
    rmask = rows < OUT
    cols = grp.to(tl.int64) * GS + tl.arange(0, GS)
    x = tl.load(w + rows[:, None] * IN + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    tl.store(flags, 1, mask=nonfinite(x))
    int4_tile(x, rows, rmask, grp, q0, q1, q2, flags, 1, OUT, IN, R, GS, LAYOUT, SYM)


@triton.jit(do_not_specialize=["k0", "k1", "const_div", "lam"])
def _merge_int4_kernel(
    base, xs, keeps, sign, flags, thr, scale, weights, probs, bs0, bs1, S0, S1, k0, k1, C,
    const_div, lam, q0, q1, q2, OUT,
    K: tl.constexpr, KINDS: tl.constexpr, HAS_BASE: tl.constexpr, STRIDED: tl.constexpr,
    SCALE_MODE: tl.constexpr, CONSENSUS: tl.constexpr, ELECT_WEIGHTED: tl.constexpr,
    DIVISOR: tl.constexpr, NORMALIZE: tl.constexpr, APPLY_LAM: tl.constexpr, DT: tl.constexpr,
    R: tl.constexpr, GS: tl.constexpr, LAYOUT: tl.constexpr, SYM: tl.constexpr,
):
    """The merge of a ``[R, GS]`` tile (rows x one group), rounded to the output dtype ``DT``
    and quantized; flags: inputs ``0..K-1``, base ``K``, a non-finite merged value ``K + 1``,
    a GPTQ fp16 scale overflow ``K + 2``."""
    ngrp = C // GS  # one grid dimension, as _int4_kernel
    grp = tl.program_id(0) % ngrp
    tile = tl.program_id(0) // ngrp
    t = tl.arange(0, R * GS // 4)  # the tile's groups of four, row-major
    row = tile.to(tl.int64) * R + t // (GS // 4)
    g = row * (C // 4) + grp.to(tl.int64) * (GS // 4) + t % (GS // 4)
    col = tl.arange(0, 4)[None, :]
    i = g[:, None] * 4 + col
    inb = (row < OUT)[:, None] & (col < 4)
    key0, key1 = seed_key(k0, k1)
    mixed = merge_tile(base, xs, keeps, sign, flags, thr, scale, weights, probs, bs0, bs1, S0, S1,
                       key0, key1, g, col, i, inb, C, const_div, lam, K, KINDS, HAS_BASE, STRIDED,
                       SCALE_MODE, CONSENSUS, ELECT_WEIGHTED, DIVISOR, NORMALIZE, False, APPLY_LAM)
    x = tl.reshape(round_to(mixed, DT), [R, GS])
    tl.store(flags + K + 1, 1, mask=nonfinite(x))
    rows = tile.to(tl.int64) * R + tl.arange(0, R)
    int4_tile(x, rows, rows < OUT, grp, q0, q1, q2, flags, K + 2, OUT, C, R, GS, LAYOUT, SYM)


@triton.jit
def fp8_bits(v, MB: tl.constexpr, BIAS: tl.constexpr, SUB: tl.constexpr, MIN_NORMAL: tl.constexpr):
    """The FP8 code (uint8: sign, exponent with ``BIAS``, ``MB`` mantissa bits) of finite fp32
    ``v`` with ``|v| <= fmax``, rounded to nearest even; subnormals are multiples of
    ``2**(1 - BIAS - MB)`` (``SUB = 2**(BIAS - 1 + MB)``, ``MIN_NORMAL = 2**(1 - BIAS)``)."""
    u = v.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    normal = ((a + ((1 << (22 - MB)) - 1) + ((a >> (23 - MB)) & 1)) >> (23 - MB)) - ((127 - BIAS) << MB)
    mag = a.to(tl.float32, bitcast=True)
    sub = rne(mag * SUB).to(tl.uint32)  # an exact power-of-two scaling
    code = tl.where(mag < MIN_NORMAL, sub, normal)
    return (code | ((u >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def cell_chunk(w, r, c, r1, c1, COLS, RB: tl.constexpr, CB: tl.constexpr):
    """The fp32 values of the ``[RB, CB]`` chunk at row ``r``, column ``c`` of a cell ending
    at ``(r1, c1)``, their offsets and the in-cell mask."""
    rows = r + tl.arange(0, RB).to(tl.int64)
    cols = c + tl.arange(0, CB).to(tl.int64)
    m = (rows < r1)[:, None] & (cols < c1)[None, :]
    off = rows[:, None] * COLS + cols[None, :]
    return tl.load(w + off, mask=m, other=0.0).to(tl.float32), off, m


@triton.jit
def _fp8_cell_kernel(w, q, scale, flags, ROWS, COLS, BR, BC, NCB, fmax,
                     RB: tl.constexpr, CB: tl.constexpr, MODE: tl.constexpr, DT: tl.constexpr,
                     MB: tl.constexpr, BIAS: tl.constexpr, SUB: tl.constexpr, MIN_NORMAL: tl.constexpr):
    """One program per cell of ``BR`` rows x ``BC`` columns of the 2-D view ``[ROWS, COLS]``.
    MODE 0: the cell's scale ``round_DT(amax / fmax)`` (0 -> fp32 eps) into ``scale[cell]``,
    then its codes; MODE 1: only the cell's amax, atomically maxed into ``scale[0]`` (int32
    bits of a non-negative float); MODE 2: codes with the scale ``scale[0]``."""
    cell = tl.program_id(0)
    r0 = (cell // NCB).to(tl.int64) * BR
    c0 = (cell % NCB).to(tl.int64) * BC
    r1 = tl.minimum(r0 + BR, ROWS)
    c1 = tl.minimum(c0 + BC, COLS)
    if MODE == 2:
        s = tl.load(scale)
    else:
        amax = tl.zeros([RB, CB], tl.float32)
        # while loops: Triton 3.6's interpreter cannot run a for loop over runtime bounds
        dr = 0
        while dr < BR:
            dc = 0
            while dc < BC:
                x, off, m = cell_chunk(w, r0 + dr, c0 + dc, r1, c1, COLS, RB, CB)
                tl.store(flags, 1, mask=nonfinite(x))
                amax = tl.maximum(amax, tl.abs(x))
                dc += CB
            dr += RB
        a = tl.max(tl.max(amax, axis=1), axis=0)
        if MODE == 1:
            tl.atomic_max(scale, a.to(tl.int32, bitcast=True))
        else:
            s = round_to(tl.math.div_rn(a, fmax), DT)
            s = tl.where(s == 0.0, FP32_EPS, s)
            tl.store(scale + cell, s)
    if MODE != 1:
        dr = 0
        while dr < BR:
            dc = 0
            while dc < BC:
                x, off, m = cell_chunk(w, r0 + dr, c0 + dc, r1, c1, COLS, RB, CB)
                if MODE == 2:
                    tl.store(flags, 1, mask=nonfinite(x))
                v = tl.minimum(tl.maximum(tl.math.div_rn(x, s + tl.zeros_like(x)), -fmax), fmax)
                tl.store(q + off, fp8_bits(v, MB, BIAS, SUB, MIN_NORMAL), mask=m)
                dc += CB
            dr += RB


# --------------------------------------------------------------------------------- launchers

def quantize_int4(w, cfg):
    """INT4 of a contiguous ``w [out, in]``: ``(tensors, flags)`` with ``flags`` int32 ``[2]``
    on the device (non-finite input, GPTQ fp16 scale overflow)."""
    out_f, in_f = w.shape
    res = int4_outputs(cfg, out_f, in_f, w.dtype, w.device)
    flags = torch.zeros(2, dtype=torch.int32, device=w.device)
    if w.numel():
        G = cfg.group_size
        R = INT4_ELEMS // G
        _int4_kernel[(triton.cdiv(out_f, R) * (in_f // G),)](
            w, *res.values(), flags, out_f, in_f, R=R, GS=G,
            LAYOUT=abi.QUANT_OF_LAYOUT[cfg.layout], SYM=cfg.symmetric,
            # 4 warps spill registers on the fp32 g64 tile (sm_90, n specialised); 8 warps give
            # the other tiles' threads one packed word each (scalar stores): 4 there
            num_warps=8 if w.element_size() == 4 and G == 64 else 4, enable_fp_fusion=False)
    return res, flags


def quantize_fp8(w, dt, granularity, block):
    """FP8 of a contiguous ``w`` into codes of dtype ``dt``: ``(q, scale, flags)``; ``scale``
    is fp32 of the granularity's shape except per tensor, where it is the amax (fp32, ``[1]``)
    that the caller turns into the scale with torch's own ops, and ``q`` is still to be
    filled by :func:`fp8_codes`. ``flags`` int32 ``[2]``: a non-finite input, and a slot that
    FP8 never sets (INT4's scale overflow), so both formats' flags read alike."""
    dev = w.device
    shape = tuple(w.shape)
    mb, bias, fmax = FP8[dt]
    q = torch.empty(shape, dtype=dt, device=dev)
    flags = torch.zeros(2, dtype=torch.int32, device=dev)
    cols = shape[-1] if len(shape) else 1
    rows = w.numel() // cols if cols else 0
    if granularity == "tensor":
        amax = torch.zeros(1, dtype=torch.int32, device=dev)  # bits of a non-negative fp32
        if w.numel():  # the tensor as one flat row in cells of TENSOR_CELL elements
            _fp8_cells(w, q, amax, flags, 1, w.numel(), (1, TENSOR_CELL), 1, w.dtype, mb, bias, fmax)
        return q, amax.view(torch.float32), flags
    br, bc = (1, cols) if granularity == "row" else block
    scale = torch.empty(fp8_scale_shape(shape, granularity, block), dtype=torch.float32, device=dev)
    if w.numel():
        _fp8_cells(w, q, scale, flags, rows, cols, (br, bc), 0, w.dtype, mb, bias, fmax)
    return q, scale, flags


def fp8_codes(w, q, scale, flags):
    """Per-tensor FP8 codes of ``w`` with the fp32 scale ``scale`` (``[1]``) into ``q``."""
    if w.numel():
        mb, bias, fmax = FP8[q.dtype]
        _fp8_cells(w, q, scale, flags, 1, w.numel(), (1, TENSOR_CELL), 2, w.dtype, mb, bias, fmax)


def _fp8_cells(w, q, scale, flags, rows, cols, cell, mode, dtype, mb, bias, fmax):
    br, bc = cell
    CB = min(triton.next_power_of_2(bc), 1024)
    RB = max(1, min(triton.next_power_of_2(br), 2048 // CB))
    ncb = triton.cdiv(cols, bc)
    _fp8_cell_kernel[(triton.cdiv(rows, br) * ncb,)](
        w, q.view(torch.uint8), scale, flags, rows, cols, br, bc, ncb, fmax, RB=RB, CB=CB,
        MODE=mode, DT=abi.dtype_code(dtype), MB=mb, BIAS=bias, SUB=2.0 ** (bias - 1 + mb),
        MIN_NORMAL=2.0 ** (1 - bias), num_warps=4, enable_fp_fusion=False)


def fused_merge_int4(base, xs, cfg, out_dtype, *, n, C, **kw):
    """The merge pass (arguments: :func:`fused_merge.launch_args`) quantized to INT4 as it goes:
    ``(tensors, flags)`` with flags ``[K + 3]`` (inputs, base, merged value, GPTQ scale
    overflow)."""
    K = len(xs)
    out_f = n // C
    res = int4_outputs(cfg, out_f, C, out_dtype, xs[0].device)
    flags = torch.zeros(K + 3, dtype=torch.int32, device=xs[0].device)
    G = cfg.group_size
    R = max(8, 4 * groups_per_program(K) // G)
    q0, q1, q2 = res.values()
    _merge_int4_kernel[(triton.cdiv(out_f, R) * (C // G),)](
        q0=q0, q1=q1, q2=q2, OUT=out_f, DT=abi.dtype_code(out_dtype), R=R, GS=G,
        LAYOUT=abi.QUANT_OF_LAYOUT[cfg.layout], SYM=cfg.symmetric,
        **launch_args(base, xs, flags, C=C, **kw))
    return res, flags
