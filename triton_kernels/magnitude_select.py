"""Exact top-k selection by magnitude: for each query ``(model m, k)`` the pair ``(T, J)`` such
that ``{key > T} + {key == T and index <= J}`` holds exactly the k largest ``|d_m|`` (``key`` the
31-bit pattern of ``|d_m|``, ties at the threshold to the lowest flat index). No sort of the
input, no mask.

Fast path (one streaming pass over base + the queried inputs):

1. a strided sample of ``2**16`` keys per input, sorted on the device, brackets the k-th key
   in ``[lo, hi]`` (4 standard deviations of the sample quantile either side);
2. one pass counts the keys above ``hi`` and compacts the few keys in ``[lo, hi]`` with their
   indices (atomic slot reservation per program, in-program prefix sum);
3. the ``need = k - above``-th candidate in (key desc, index asc) order is the answer: a
   2048-bin histogram over the candidates' key range picks the bin that holds it, and only
   that bin's candidates are sorted (as unique ``(~key, index)`` 64-bit composites), so ties
   are split by lowest index exactly. No host read: the caller reads one flag per query
   (bracket missed) with its own flags (``select_deferred``), or ``select`` reads it.

Inputs of at most ``2**16`` elements skip the sample: every element is a candidate.

Fallback when the bracket misses (count check fails or the candidate buffer overflows, e.g.
a huge run of equal magnitudes): histogram radix select on the GPU, three passes over digits
of 11, 10 and 10 bits (``tl.histogram`` per program, merged with atomics, bucket choice on the
device), then, only if the ties at the threshold are split, a count pass per program and a
prefix scan that finds the index of the last kept tie.
"""
import math

import torch
import triton
import triton.language as tl

from fastmerge._transfer import to_device, to_host

from ._common import block_tile, delta, load_base, mag_key, minus_base

SAMPLE = 1 << 16          # keys sampled per input for the bracket
ALL_CANDIDATES = 1 << 16  # inputs this small skip the sample: every key is a candidate
KEY_MAX = 0x7FFFFFFF
BLOCK = 4096


@triton.jit(do_not_specialize=["n", "C", "S", "A"])
def _sample_keys_kernel(base, xs, out, bs0, bs1, S0, S1, n, C, S, A, M: tl.constexpr,
                        HAS_BASE: tl.constexpr, STRIDED: tl.constexpr, BLOCK_S: tl.constexpr):
    s, valid = block_tile(tl.program_id(0), S, BLOCK_S)
    i = (s * A) % n  # a Weyl sequence (sample_step): every row and column, no layout stride
    b = load_base(base, i, valid, C, bs0, bs1, HAS_BASE, STRIDED)
    for m in tl.static_range(M):
        d = minus_base(xs[m], b, i, valid, C, S0[m], S1[m], HAS_BASE, STRIDED)
        tl.store(out + m * S + s, mag_key(d), mask=valid)


@triton.jit(do_not_specialize=["C", "cap"])
def _bracket_kernel(base, xs, lo, hi, above_part, count, ckeys, cidx, flag, cap, bs0, bs1, S0,
                    S1, n, C, M: tl.constexpr, Q: tl.constexpr, QM: tl.constexpr,
                    HAS_BASE: tl.constexpr, STRIDED: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    i, inb = block_tile(pid, n, BLK)
    b = load_base(base, i, inb, C, bs0, bs1, HAS_BASE, STRIDED)
    for m in tl.static_range(M):
        key = mag_key(minus_base(xs[m], b, i, inb, C, S0[m], S1[m], HAS_BASE, STRIDED))
        tl.store(flag, 1, mask=tl.max((key >= 0x7F800000).to(tl.int32), axis=0) > 0)
        for q in tl.static_range(Q):
            if QM[q] == m:
                h = tl.load(hi + q)
                above = tl.sum(((key > h) & inb).to(tl.int64), axis=0)
                tl.store(above_part + pid.to(tl.int64) * Q + q, above)
                cand = (key >= tl.load(lo + q)) & (key <= h) & inb
                c32 = cand.to(tl.int32)
                cnt = tl.sum(c32, axis=0)
                start = tl.atomic_add(count + q, cnt.to(tl.int64), mask=cnt > 0)
                pos = start + (tl.cumsum(c32, axis=0) - 1).to(tl.int64)
                ok = cand & (pos < cap)
                slot = tl.full([], q, tl.int64) * cap + pos  # int64: Q * cap may pass 2**31
                tl.store(ckeys + slot, key, mask=ok)
                tl.store(cidx + slot, i, mask=ok)


@triton.jit(do_not_specialize=["C", "prefix"])
def _radix_hist_kernel(base, x, hist, flag, prefix, bs0, bs1, s0, s1, n, C, SHIFT: tl.constexpr,
                       PSHIFT: tl.constexpr, NB: tl.constexpr, HAS_BASE: tl.constexpr,
                       STRIDED: tl.constexpr, BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    key = mag_key(delta(x, base, i, inb, C, s0, s1, bs0, bs1, HAS_BASE, STRIDED))
    tl.store(flag, 1, mask=tl.max((key >= 0x7F800000).to(tl.int32), axis=0) > 0)
    match = ((key >> PSHIFT) == prefix) & inb
    h = tl.histogram((key >> SHIFT) & (NB - 1), NB, mask=match)
    tl.atomic_add(hist + tl.arange(0, NB), h.to(tl.int64), mask=h > 0)


@triton.jit(do_not_specialize=["C", "T"])
def _tie_count_kernel(base, x, counts, T, bs0, bs1, s0, s1, n, C, HAS_BASE: tl.constexpr,
                      STRIDED: tl.constexpr, BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    eq = (mag_key(delta(x, base, i, inb, C, s0, s1, bs0, bs1, HAS_BASE, STRIDED)) == T) & inb
    tl.store(counts + tl.program_id(0), tl.sum(eq.to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["C", "T", "tile", "need"])
def _tie_find_kernel(base, x, out, T, tile, need, bs0, bs1, s0, s1, n, C,
                     HAS_BASE: tl.constexpr, STRIDED: tl.constexpr, BLK: tl.constexpr):
    i, inb = block_tile(tile, n, BLK)
    eq = (mag_key(delta(x, base, i, inb, C, s0, s1, bs0, bs1, HAS_BASE, STRIDED)) == T) & inb
    cs = tl.cumsum(eq.to(tl.int64), axis=0)
    hit = eq & (cs == need)
    tl.store(out, tl.sum(tl.where(hit, i, 0), axis=0))


@triton.jit(do_not_specialize=["cap"])
def _cand_hist_kernel(ckeys, qidx, counts, lo, shift, hist, cap, NB: tl.constexpr, BLK: tl.constexpr):
    """Histogram of candidate keys ``(key - lo) >> shift`` of query row ``program_id(1)``."""
    v = tl.program_id(1)
    q = tl.load(qidx + v).to(tl.int64)
    j, m = block_tile(tl.program_id(0), tl.load(counts + v), BLK)
    key = tl.load(ckeys + q * cap + j, mask=m, other=0)
    h = tl.histogram((key - tl.load(lo + v)) >> tl.load(shift + v), NB, mask=m)
    tl.atomic_add(hist + v * NB + tl.arange(0, NB), h.to(tl.int64), mask=h > 0)


@triton.jit(do_not_specialize=["cap", "cap2"])
def _cand_pick_kernel(ckeys, cidx, qidx, counts, lo, shift, bins, fill, okeys, oidx, cap, cap2,
                      BLK: tl.constexpr):
    """The candidates of query row ``program_id(1)`` that fall in its chosen histogram bin."""
    v = tl.program_id(1)
    q = tl.load(qidx + v).to(tl.int64)
    j, m = block_tile(tl.program_id(0), tl.load(counts + v), BLK)
    key = tl.load(ckeys + q * cap + j, mask=m, other=0)
    sel = m & (((key - tl.load(lo + v)) >> tl.load(shift + v)) == tl.load(bins + v))
    s32 = sel.to(tl.int32)
    cnt = tl.sum(s32, axis=0)
    start = tl.atomic_add(fill + v, cnt.to(tl.int64), mask=cnt > 0)
    loc = start + (tl.cumsum(s32, axis=0) - 1).to(tl.int64)
    sel = sel & (loc < cap2)  # a bin larger than its buffer: the host sees fill > cap2
    pos = v.to(tl.int64) * cap2 + loc
    tl.store(okeys + pos, key, mask=sel)
    tl.store(oidx + pos, tl.load(cidx + q * cap + j, mask=sel, other=0), mask=sel)


# ----------------------------------------------------------------------------- host side


def sample_step(n: int) -> int:
    """The sample's stride ``A``: element ``(s * A) mod n`` is sample ``s``. ``A`` is coprime
    to ``n`` (distinct elements) and near ``n`` times the golden ratio's fraction, so the
    samples spread evenly over every row and column whatever the layout (``(s * n) // S``
    took one column in ``n / S`` of a row-major matrix: 32 of 4096 columns at 2048 x 4096)."""
    a = max(1, round(n * 0.6180339887498949))
    while math.gcd(a, n) != 1:
        a += 1
    return a


def _args(base, strided):
    return dict(HAS_BASE=base is not None, STRIDED=strided, enable_fp_fusion=False)


def _bracket(base, xs, strides, base_strides, n, C, strided, qm, qk, out, flag):
    """The sample-bracket pass, on the device only (no host read): fills every row of ``out``
    and returns ``(missed, info)``: int32 ``[Q]`` device flags, 1 where the bracket missed (the
    row is then meaningless: the fallback must answer that query), and int64 ``[4, Q]``
    ``(need, count, lo, hi)`` (the rank still needed below ``hi``, the keys in ``[lo, hi]``)."""
    dev = xs[0].device
    Q = len(qm)
    models = sorted(set(qm))
    slot = {m: s for s, m in enumerate(models)}
    xs_sel = tuple(xs[m] for m in models)
    S0 = tuple(strides[m][0] for m in models)
    S1 = tuple(strides[m][1] for m in models)
    b = base if base is not None else xs_sel[0]
    if n <= ALL_CANDIDATES:
        lo = torch.zeros(Q, dtype=torch.int32, device=dev)
        hi = torch.full((Q,), KEY_MAX, dtype=torch.int32, device=dev)
        caps = [n] * Q
    else:
        keys = torch.empty(len(models), SAMPLE, dtype=torch.int32, device=dev)
        _sample_keys_kernel[(triton.cdiv(SAMPLE, 1024),)](
            b, xs_sel, keys, base_strides[0], base_strides[1], S0, S1, n, C, SAMPLE, sample_step(n),
            M=len(models), BLOCK_S=1024, num_warps=4, **_args(base, strided))
        srt = torch.sort(keys, dim=1, descending=True).values
        rows, hi_at, lo_at, caps = [], [], [], []  # caps: expected candidates, with slack
        for m, k in zip(qm, qk):
            f = k / n
            rank = f * SAMPLE
            margin = 4.0 * math.sqrt(SAMPLE * f * (1.0 - f)) + 16.0
            rh, rl = math.floor(rank - margin), math.ceil(rank + margin)
            rows.append(slot[m])
            hi_at.append(rh if rh > 0 else -1)
            lo_at.append(rl if rl < SAMPLE - 1 else -1)
            expect = (min(rl, SAMPLE) - max(rh, 0) + 1) / SAMPLE * n
            caps.append(int(min(n, 2 * expect + 4096)))
        r, hi_idx, lo_idx = to_device([rows, hi_at, lo_at], torch.int64, dev)
        hi = torch.where(hi_idx >= 0, srt[r, hi_idx.clamp(min=0)], KEY_MAX).to(torch.int32)
        lo = torch.where(lo_idx >= 0, srt[r, lo_idx.clamp(min=0)], 0).to(torch.int32)
    cap = max(caps)
    P = triton.cdiv(n, BLOCK)
    above_part = torch.zeros(P, Q, dtype=torch.int64, device=dev)
    count = torch.zeros(Q, dtype=torch.int64, device=dev)
    ckeys = torch.empty(Q * cap, dtype=torch.int32, device=dev)
    cidx = torch.empty(Q * cap, dtype=torch.int64, device=dev)
    _bracket_kernel[(P,)](
        b, xs_sel, lo, hi, above_part, count, ckeys, cidx, flag, cap, base_strides[0], base_strides[1],
        S0, S1, n, C, M=len(models), Q=Q, QM=tuple(slot[m] for m in qm), BLK=BLOCK, num_warps=8,
        **_args(base, strided))
    need = to_device(list(qk), torch.int64, dev) - above_part.sum(dim=0)
    ok = (need >= 1) & (need <= count) & (count <= cap)
    # clamped so that a missed bracket still reads and writes in bounds (its row is discarded)
    cnt = count.clamp(max=cap)
    ok &= _finish(ckeys, cidx, cap, torch.minimum(need.clamp(min=1), cnt.clamp(min=1)), cnt, lo,
                  hi, n, out)
    return (~ok).to(torch.int32), torch.stack([need, count, lo.long(), hi.long()])


def _choose_bins(hist, need):
    """Per row of ``hist`` (``[R, NB]``): the highest bin whose suffix count reaches ``need``,
    the rank still needed inside it and its count (device tensors)."""
    suffix = hist.flip(1).cumsum(1).flip(1)
    b = ((suffix >= need[:, None]).sum(1) - 1).clamp(min=0)
    above = torch.cat([suffix, torch.zeros_like(suffix[:, :1])], 1).gather(1, (b + 1)[:, None])[:, 0]
    return b, need - above, hist.gather(1, b[:, None])[:, 0]


def slot_bound(cap: int, n: int) -> int:
    """Candidates kept of the histogram bin that holds the answer (its buffer per query): all
    of them for small inputs (every key a candidate, spread over few bins); else the narrow
    bracket's candidates spread over 2048 bins, so 64 times the mean bin leaves ample slack,
    and a fuller bin (a run of equal magnitudes) is a missed bracket: the fallback answers."""
    return cap if n <= ALL_CANDIDATES else min(cap, max(8192, cap // 32))


def _finish(ckeys, cidx, cap, need, cnt, lo, hi, n, out):
    """The need-th candidate in (key desc, index asc) order of every query (device tensors,
    no host read), without sorting all candidates: a 2048-bin histogram over the candidates'
    key range picks the bin that holds it, and only that bin's candidates (at most
    :func:`slot_bound`) are sorted. Returns the bool ``[Q]`` device tensor of the queries whose
    bin fitted."""
    dev = ckeys.device
    V = len(need)
    NB = 2048
    width = (hi.to(torch.int64) - lo.to(torch.int64)).clamp(min=0)
    bits = ((width[:, None] >> torch.arange(32, device=dev)) > 0).sum(1)  # bit_length, exact
    shift = (bits - 11).clamp(min=0).to(torch.int32)
    qidx = torch.arange(V, dtype=torch.int32, device=dev)
    lo32 = lo.to(torch.int32)
    hist = torch.zeros(V, NB, dtype=torch.int64, device=dev)
    grid = (triton.cdiv(cap, BLOCK), V)
    _cand_hist_kernel[grid](ckeys, qidx, cnt, lo32, shift, hist, cap, NB=NB, BLK=BLOCK,
                            num_warps=8, enable_fp_fusion=False)
    bins, need2, size = _choose_bins(hist, need)
    cap2 = slot_bound(cap, n)
    okeys = torch.full((V * cap2,), -1, dtype=torch.int32, device=dev)  # -1: after every key
    oidx = torch.full((V * cap2,), -1, dtype=torch.int64, device=dev)
    fill = torch.zeros(V, dtype=torch.int64, device=dev)
    _cand_pick_kernel[grid](ckeys, cidx, qidx, cnt, lo32, shift, bins.to(torch.int32), fill, okeys,
                            oidx, cap, cap2, BLK=BLOCK, num_warps=8, enable_fp_fusion=False)
    key = okeys.view(V, cap2).to(torch.int64)
    idx = oidx.view(V, cap2)
    at = (need2 - 1).clamp(0, cap2 - 1)[:, None]
    if n < (1 << 32):  # one sort of unique composites: ascending = key desc, index asc
        c = torch.where(key >= 0, ((KEY_MAX - key) << 32) | idx, torch.iinfo(torch.int64).max)
        c = torch.sort(c, dim=1).values.gather(1, at)[:, 0]  # the unused slots last
        out[:, 0] = KEY_MAX - (c >> 32)
        out[:, 1] = c & 0xFFFFFFFF
    else:
        o = torch.sort(idx.clamp(min=0), dim=1, stable=True).indices
        o = o.gather(1, torch.sort(key.gather(1, o), dim=1, descending=True, stable=True).indices)
        pick = o.gather(1, at)
        out[:, 0] = key.gather(1, pick)[:, 0]
        out[:, 1] = idx.gather(1, pick)[:, 0]
    return size <= cap2


def _radix(base, x, s, base_strides, n, C, strided, k, out_row, flag):
    """Histogram radix select of one query (digits of 11, 10, 10 bits), then the tie scan."""
    dev = x.device
    b = base if base is not None else x
    P = triton.cdiv(n, BLOCK)
    common = dict(BLK=BLOCK, num_warps=8, **_args(base, strided))
    prefix, need = 0, k
    for shift, bits in ((20, 11), (10, 10), (0, 10)):
        nb = 1 << bits
        hist = torch.zeros(nb, dtype=torch.int64, device=dev)
        _radix_hist_kernel[(P,)](b, x, hist, flag, prefix, base_strides[0], base_strides[1], s[0], s[1],
                                 n, C, SHIFT=shift, PSHIFT=shift + bits, NB=nb, **common)
        digit, rest, count = _choose_bins(hist[None], to_device([need], torch.int64, dev))
        digit, need, eq = to_host(torch.stack([digit, rest, count])[:, 0])
        prefix = (prefix << bits) | digit
    _ties(base, x, s, base_strides, n, C, strided, prefix, need, eq, out_row)


def _ties(base, x, s, base_strides, n, C, strided, T, need, eq, out_row):
    """``(T, J)`` into ``out_row`` once the threshold key ``T`` is known, with ``need`` of its
    ``eq`` ties kept: J is the index of the need-th tie (a count pass, a scan, one tile)."""
    dev = x.device
    b = base if base is not None else x
    P = triton.cdiv(n, BLOCK)
    common = dict(BLK=BLOCK, num_warps=8, **_args(base, strided))
    out_row[0] = T
    if need >= eq:
        out_row[1] = n  # every tie at T is kept
        return
    counts = torch.empty(P, dtype=torch.int64, device=dev)
    _tie_count_kernel[(P,)](b, x, counts, T, base_strides[0], base_strides[1], s[0], s[1], n, C,
                            **common)
    cum = counts.cumsum(0)
    tile = to_host(torch.searchsorted(cum, to_device([need], torch.int64, dev)))[0]
    before = to_host(cum[tile - 1]) if tile > 0 else 0
    j = torch.empty((), dtype=torch.int64, device=dev)
    _tie_find_kernel[(1,)](b, x, j, T, tile, need - before, base_strides[0], base_strides[1],
                           s[0], s[1], n, C, **common)
    out_row[1] = j


def select_deferred(base, xs, *, qm, qk, n, C, strides, base_strides, strided, flag=None):
    """:func:`select`'s fast path alone, with no host read: ``(out, missed)``, ``missed`` int32
    ``[Q]`` device flags of the queries whose bracket missed (their rows are meaningless). The
    driver reads them with the merge's own flags (its one host read) and redoes a merge whose
    bracket missed with :func:`select`."""
    dev = xs[0].device
    out = torch.empty(len(qm), 2, dtype=torch.int64, device=dev)
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
    missed, _ = _bracket(base, xs, strides, base_strides, n, C, strided, qm, qk, out, flag)
    return out, missed


def select(base, xs, *, qm, qk, n, C, strides, base_strides, strided, flag=None,
           force_radix=False):
    """``[Q, 2]`` int64 device tensor of ``(T, J)`` for queries ``(qm[q], qk[q])`` with
    ``0 < k < n``. ``flag`` (int32, one element), if given, is set to 1 when a queried delta
    holds inf or nan (the selection is then meaningless, and the caller raises). One host read
    when the bracket answers every query; the radix fallback reads its digits."""
    dev = xs[0].device
    Q = len(qm)
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
    out = torch.empty(Q, 2, dtype=torch.int64, device=dev)
    if force_radix:
        missed, info = [1] * Q, [[0] * Q, [0] * Q, [0] * Q, [1] * Q]
    else:
        missed, info = _bracket(base, xs, strides, base_strides, n, C, strided, qm, qk, out, flag)
        missed, *info = to_host(torch.cat([missed.long()[None], info]))
    for q in range(Q):
        if not missed[q]:
            continue
        need, count, lo, hi = (row[q] for row in info)
        x, st = xs[qm[q]], strides[qm[q]]
        if lo == hi and 1 <= need <= count:
            # the k-th key is the run of ties the sample landed in (frozen or very sparse
            # deltas): T is known, only the ties need counting (no radix passes)
            _ties(base, x, st, base_strides, n, C, strided, lo, need, count, out[q])
            continue
        _radix(base, x, st, base_strides, n, C, strided, qk[q], out[q], flag)
    return out
