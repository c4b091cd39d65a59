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
   are split by lowest index exactly. Two small host syncs in all.

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

from ._common import block_tile, delta, load_base, mag_key, minus_base

SAMPLE = 1 << 16          # keys sampled per input for the bracket
ALL_CANDIDATES = 1 << 16  # inputs this small skip the sample: every key is a candidate
KEY_MAX = 0x7FFFFFFF
BLOCK = 4096


@triton.jit(do_not_specialize=["n", "C", "S"])
def _sample_keys_kernel(base, xs, out, bs0, bs1, S0, S1, n, C, S, M: tl.constexpr,
                        HAS_BASE: tl.constexpr, STRIDED: tl.constexpr, BLOCK_S: tl.constexpr):
    s, valid = block_tile(tl.program_id(0), S, BLOCK_S)
    i = (s * n) // S
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
                tl.store(ckeys + q * cap + pos, key, mask=ok)
                tl.store(cidx + q * cap + pos, i, mask=ok)


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
    pos = v.to(tl.int64) * cap2 + start + (tl.cumsum(s32, axis=0) - 1).to(tl.int64)
    tl.store(okeys + pos, key, mask=sel)
    tl.store(oidx + pos, tl.load(cidx + q * cap + j, mask=sel, other=0), mask=sel)


# ----------------------------------------------------------------------------- host side


def _args(base, strided):
    return dict(HAS_BASE=base is not None, STRIDED=strided, enable_fp_fusion=False)


def _bracket(base, xs, strides, base_strides, n, C, strided, qm, qk, out, flag):
    """The sample-bracket pass. Fills ``out`` rows of the queries it answers; returns the
    indices of the queries it could not answer (for the radix fallback)."""
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
            b, xs_sel, keys, base_strides[0], base_strides[1], S0, S1, n, C, SAMPLE,
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
        r = torch.tensor(rows, device=dev)
        hi_idx = torch.tensor(hi_at, device=dev)
        lo_idx = torch.tensor(lo_at, device=dev)
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
    above = above_part.sum(dim=0)
    stats = torch.stack([above, count, lo.long(), hi.long()]).tolist()  # host sync 1 of 2
    failed, ok = [], []
    for q in range(Q):
        if 1 <= qk[q] - stats[0][q] <= stats[1][q] <= cap:
            ok.append(q)
        else:
            failed.append(q)
    if ok:
        _finish(ckeys, cidx, cap, ok, [qk[q] - stats[0][q] for q in ok], [stats[1][q] for q in ok],
                [stats[2][q] for q in ok], [stats[3][q] for q in ok], n, out)
    return failed


def _choose_bins(hist, need):
    """Per row of ``hist`` (``[R, NB]``): the highest bin whose suffix count reaches ``need``,
    the rank still needed inside it and its count (device tensors)."""
    suffix = hist.flip(1).cumsum(1).flip(1)
    b = ((suffix >= need[:, None]).sum(1) - 1).clamp(min=0)
    above = torch.cat([suffix, torch.zeros_like(suffix[:, :1])], 1).gather(1, (b + 1)[:, None])[:, 0]
    return b, need - above, hist.gather(1, b[:, None])[:, 0]


def _finish(ckeys, cidx, cap, ok, need, cnt, lo, hi, n, out):
    """The need-th candidate in (key desc, index asc) order for each query in ``ok``, without
    sorting all candidates: a 2048-bin histogram over the candidates' key range picks the bin
    that holds it, and only that bin's few candidates are sorted."""
    dev = ckeys.device
    V = len(ok)
    NB = 2048
    shift = [max(0, (h - lo_).bit_length() - 11) for lo_, h in zip(lo, hi)]
    qidx = torch.tensor(ok, dtype=torch.int32, device=dev)
    counts = torch.tensor(cnt, dtype=torch.int64, device=dev)
    lo_t = torch.tensor(lo, dtype=torch.int32, device=dev)
    shift_t = torch.tensor(shift, dtype=torch.int32, device=dev)
    hist = torch.zeros(V, NB, dtype=torch.int64, device=dev)
    grid = (triton.cdiv(max(cnt), BLOCK), V)
    _cand_hist_kernel[grid](ckeys, qidx, counts, lo_t, shift_t, hist, cap, NB=NB, BLK=BLOCK,
                            num_warps=8, enable_fp_fusion=False)
    bins, need2, size = _choose_bins(hist, torch.tensor(need, dtype=torch.int64, device=dev))
    need2_h, size_h = torch.stack([need2, size]).tolist()  # host sync 2 of 2
    cap2 = max(size_h)
    okeys = torch.empty(V * cap2, dtype=torch.int32, device=dev)
    oidx = torch.empty(V * cap2, dtype=torch.int64, device=dev)
    fill = torch.zeros(V, dtype=torch.int64, device=dev)
    _cand_pick_kernel[grid](ckeys, cidx, qidx, counts, lo_t, shift_t, bins.to(torch.int32), fill, okeys,
                            oidx, cap, cap2, BLK=BLOCK, num_warps=8, enable_fp_fusion=False)
    for v, q in enumerate(ok):
        key = okeys[v * cap2:v * cap2 + size_h[v]].to(torch.int64)
        idx = oidx[v * cap2:v * cap2 + size_h[v]]
        if n < (1 << 32):  # one sort of unique composites: ascending = key desc, index asc
            c = torch.sort(((KEY_MAX - key) << 32) | idx).values[need2_h[v] - 1]
            out[q, 0] = KEY_MAX - (c >> 32)
            out[q, 1] = c & 0xFFFFFFFF
        else:
            o = torch.sort(idx, stable=True).indices
            o = o[torch.sort(key[o], descending=True, stable=True).indices]
            out[q, 0] = key[o[need2_h[v] - 1]]
            out[q, 1] = idx[o[need2_h[v] - 1]]


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
        digit, rest, count = _choose_bins(hist[None], torch.tensor([need], device=dev))
        digit, need, eq = torch.stack([digit, rest, count])[:, 0].tolist()
        prefix = (prefix << bits) | digit
    T = prefix
    out_row[0] = T
    if need >= eq:
        out_row[1] = n  # every tie at T is kept
        return
    counts = torch.empty(P, dtype=torch.int64, device=dev)
    _tie_count_kernel[(P,)](b, x, counts, T, base_strides[0], base_strides[1], s[0], s[1], n, C,
                            **common)
    cum = counts.cumsum(0)
    tile = int(torch.searchsorted(cum, torch.tensor([need], device=dev)).item())
    before = int(cum[tile - 1].item()) if tile > 0 else 0
    j = torch.empty((), dtype=torch.int64, device=dev)
    _tie_find_kernel[(1,)](b, x, j, T, tile, need - before, base_strides[0], base_strides[1],
                           s[0], s[1], n, C, **common)
    out_row[1] = j


def select(base, xs, *, qm, qk, n, C, strides, base_strides, strided, flag=None,
           force_radix=False):
    """``[Q, 2]`` int64 device tensor of ``(T, J)`` for queries ``(qm[q], qk[q])`` with
    ``0 < k < n``. ``flag`` (int32, one element), if given, is set to 1 when a queried delta
    holds inf or nan (the selection is then meaningless, and the caller raises)."""
    dev = xs[0].device
    Q = len(qm)
    out = torch.empty(Q, 2, dtype=torch.int64, device=dev)
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
    todo = list(range(Q))
    if not force_radix:
        todo = _bracket(base, xs, strides, base_strides, n, C, strided, qm, qk, out, flag)
    for q in todo:
        _radix(base, xs[qm[q]], strides[qm[q]], base_strides, n, C, strided, qk[q], out[q], flag)
    return out
