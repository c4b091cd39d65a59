"""The Gram pass of mergekit's other methods (slerp, nuslerp, multislerp, karcher, model_stock;
C++: ``csrc/gram.cpp``): K inputs read once, in place, the K x K matrix of their dot products
(of their deltas ``x_k - base`` when a base is given, the subtraction in fp32) per vector, in
float64.

The inputs are a 2-D view ``[nvec, nred]`` addressed by strides: element ``r`` of vector ``v``
sits at ``v * sv + r * sr`` (the whole tensor: one vector; vectors along contiguous rows:
``sv = length, sr = 1``; vectors along dim 0: ``sv = 1, sr = inner``). A program owns a
``[BV, BR]`` tile of vectors x elements and walks ``iters`` tiles along the reduction; every
product ``d_a d_b`` is formed in float64 (exact: 24 + 24 significant bits) and added
elementwise into one float64 tile per pair; the tile is then summed over its element axis
(``tl.sum``) and written as the partial sum of its split. The launcher sums the splits on the
device (``torch.sum`` over dim 0, float64). Indices are int64.

Accumulation order (deterministic for a given shape and Triton build, but not the C++ one):
per split, each tile position adds its elements in order, then Triton's tree reduction over
the tile, then torch's sum over the splits. The C++ kernel sums 8 lanes sequentially over
chunks of 32768 elements, a serial chain of 4096 adds that a GPU cannot run at bandwidth.
Both are float64 sums of the same exact products, so they differ by a few float64 ulps of
``sum |d_a d_b|``, far below the fp32 rounding of everything computed from them
(tests/test_triton_methods.py bounds the difference).

Non-finite inputs are flagged per input in the same pass (an integer OR of the fp32 values'
exponent test, reduced once per program) and written as 1.0 into the flag slots that follow
the sums in the result buffer, so one device->host read returns both. Pairs run in launches of
at most ``PAIRS_PER_LAUNCH`` (their float64 tiles live in registers); K <= 5 is one launch.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits

PAIRS_PER_LAUNCH = 15
NUM_WARPS = 4


@triton.jit
def _gram_kernel(base, xs, res, nvec, nred, sv, sr, iters, nsplit, flag_off,
                 A: tl.constexpr, B: tl.constexpr, PG: tl.constexpr, FG: tl.constexpr,
                 P: tl.constexpr, BASE_SLOT: tl.constexpr, HAS_BASE: tl.constexpr,
                 BV: tl.constexpr, BR: tl.constexpr):
    """Partial sums of pairs ``(A[p], B[p])`` (positions in ``xs``; global pair ``PG[p]``) of
    split ``s`` into ``res[(s * nvec + v) * P + PG[p]]``; input ``u``'s flag into
    ``res[flag_off + FG[u]]``, the base's into ``res[flag_off + BASE_SLOT]``."""
    pid = tl.program_id(0).to(tl.int64)
    vb = pid // nsplit
    s = pid - vb * nsplit
    v = vb * BV + tl.arange(0, BV).to(tl.int64)
    vmask = v < nvec
    accs = ()
    for p in tl.static_range(len(PG)):
        accs = accs + (tl.zeros((BV, BR), tl.float64),)
    bads = ()
    for u in tl.static_range(len(FG)):
        bads = bads + (tl.zeros((BV, BR), tl.int32),)
    bad_base = tl.zeros((BV, BR), tl.int32)
    for it in range(iters):
        r = (s * iters + it) * BR + tl.arange(0, BR).to(tl.int64)
        m = vmask[:, None] & (r < nred)[None, :]
        off = v[:, None] * sv + r[None, :] * sr
        b = tl.zeros((BV, BR), tl.float32)
        if HAS_BASE:
            b = tl.load(base + off, mask=m, other=0.0).to(tl.float32)
            bad_base = bad_base | bad_bits(b)
        vals = ()
        nb = ()
        for u in tl.static_range(len(FG)):
            x = tl.load(xs[u] + off, mask=m, other=0.0).to(tl.float32)
            nb = nb + (bads[u] | bad_bits(x),)
            if HAS_BASE:
                x = x - b
            vals = vals + (x.to(tl.float64),)
        bads = nb
        na = ()
        for p in tl.static_range(len(PG)):
            na = na + (accs[p] + vals[A[p]] * vals[B[p]],)
        accs = na
    for p in tl.static_range(len(PG)):
        tl.store(res + (s * nvec + v) * P + PG[p], tl.sum(accs[p], axis=1), mask=vmask)
    for u in tl.static_range(len(FG)):
        tl.store(res + flag_off + FG[u], 1.0, mask=tl.max(tl.ravel(bads[u]), axis=0) > 0)
    if HAS_BASE:
        tl.store(res + flag_off + BASE_SLOT, 1.0, mask=tl.max(tl.ravel(bad_base), axis=0) > 0)


def pair_blocks(K: int):
    """The upper-triangle pairs ``(p, (a, b))``, ``a <= b``, row-major (pair index ``p``, the
    C++ kernel's order), in launches of at most ``PAIRS_PER_LAUNCH``."""
    pairs = list(enumerate((a, b) for a in range(K) for b in range(a, K)))
    return [pairs[i:i + PAIRS_PER_LAUNCH] for i in range(0, len(pairs), PAIRS_PER_LAUNCH)]


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tiles(nvec: int, nred: int, contiguous_red: bool, npairs: int):
    """``(BV, BR, iters, nsplit)``: a tile of ``128 * ept`` elements (fewer per thread as the
    pairs' float64 tiles grow), long along the contiguous axis; ``iters`` tiles per program
    along the reduction, enough that the partial sums stay small next to the inputs (>= 256
    elements of each vector per program) and few enough to fill the GPU."""
    ept = max(1, min(8, 24 // max(1, npairs)))
    tile = 32 * NUM_WARPS * ept
    if contiguous_red:
        BR = min(tile, _pow2(nred))
        BV = max(1, tile // BR)
    else:
        BV = min(256, _pow2(nvec))
        BR = max(1, tile // BV)
    nvb, nrb = triton.cdiv(nvec, BV), triton.cdiv(nred, BR)
    iters = max(triton.cdiv(256, BR), (nvb * nrb) // 1024)
    iters = max(1, min(iters, 1024, nrb))
    return BV, BR, iters, triton.cdiv(nrb, iters)


def gram(base, xs, *, nvec: int, nred: int, sv: int, sr: int):
    """Launch the Gram pass of ``xs`` (tensors sharing one layout, read at ``v * sv + r * sr``;
    ``base`` subtracted when not None). Returns one float64 device tensor: the ``nvec x P``
    upper-triangle sums (pair order of :func:`pair_blocks`), then K + 1 flags (inputs, then the
    base; 1.0 where inf/nan was seen)."""
    K = len(xs)
    P = K * (K + 1) // 2
    dev = xs[0].device
    if nvec * nred == 0:
        return torch.zeros(nvec * P + K + 1, dtype=torch.float64, device=dev)
    BV, BR, iters, nsplit = tiles(nvec, nred, sr == 1 or nvec == 1, min(P, PAIRS_PER_LAUNCH))
    flag_off = nsplit * nvec * P
    res = torch.zeros(flag_off + K + 1, dtype=torch.float64, device=dev)
    for block in pair_blocks(K):
        used = sorted({k for _, ab in block for k in ab})
        pos = {k: i for i, k in enumerate(used)}
        _gram_kernel[(triton.cdiv(nvec, BV) * nsplit,)](
            base if base is not None else res, tuple(xs[k] for k in used), res, nvec, nred, sv, sr,
            iters, nsplit, flag_off,
            A=tuple(pos[a] for _, (a, _b) in block), B=tuple(pos[b] for _, (_a, b) in block),
            PG=tuple(p for p, _ in block), FG=tuple(used), P=P, BASE_SLOT=K,
            HAS_BASE=base is not None, BV=BV, BR=BR, num_warps=NUM_WARPS, enable_fp_fusion=False)
    sums = res[:flag_off].view(nsplit, nvec * P)
    sums = sums[0] if nsplit == 1 else sums.sum(dim=0)
    return torch.cat([sums, res[flag_off:]])
