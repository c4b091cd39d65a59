"""PCB-merging (spec: ``fastmerge/methods/pcb.py``; C++: ``csrc/pcb.cpp``). With ``d_k = m_k -
base``, ``tot = 0 + d_0 + d_1 + ...`` (fp32) and the clamp bounds ``lo_k, hi_k`` of ``|d_k|``::

    a       = clamp(|d_k|, lo_k, hi_k),  r = (a - lo_k) / (hi_k - lo_k)  (0 where hi_k == lo_k)
    score_k = exp(K (r r)) tanh(d_k tot)
    scale_k = (max(score_k, q_k) - q_k) / (M_k - q_k)                    (0 where M_k == q_k)
    out     = base + lam ((0 + (w_0 (sign(d_0) a_0)) scale_0 + ...) / max(0 + scale_0 + ..., 1e-12))

``pcb_scores`` writes every score (fp32, ``[K, n]``, the rows passed as K pointers); ``pcb_merge`` is the one merge pass.
``lo, hi`` (``lohi``: fp32 device ``[K, 2]``) and ``q_k`` (the score's order statistic) and
``M_k`` (its max) (``qm``: fp32 device ``[K, 2]``) are read by the kernels from the device.
The selection of those order statistics is not fused on Triton yet: the wrapper
(``backends/triton_methods.py``) takes them with ``torch.kthvalue`` / ``amax`` on the device.

``exp`` and ``tanh`` are ``csrc/fmath.h``'s polynomials (Cephes' single-precision ones)
transcribed with the same IEEE ``+``, ``*``, ``/`` in the same order (no FMA contraction,
``div_rn``), so the scores, and the merge, are the cpu backend's bytes; both are about 1 ulp
from torch's ``exp``/``tanh``, so they agree with the reference to fp32 round-off. (Triton's
``tl.exp`` is the GPU's approximation, and libdevice's ``tanh`` does not run in the
interpreter.) Flags ``[K + 2]`` (merge): models, base, the result as stored. int64 indices.
"""
import torch
import triton
import triton.language as tl

from ._common import bad_bits, block_tile, store_checked


def block_size(K: int) -> int:
    return 1024 if K <= 4 else 512 if K <= 8 else 256 if K <= 16 else 128


@triton.jit
def _pow2(e):
    """``2**e`` for int32 ``e`` in [-126, 127] (the float with that exponent field)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def exp_f(x):
    """fmath.h's ``exp_f``: x clamped to [-87, 88], ``n = round(x / ln 2)`` by the 1.5 * 2**23
    trick, a degree-6 polynomial of the Cody-Waite reduced ``r``, times ``2**n`` in two factors."""
    x = tl.where(x < -87.0, -87.0, x)
    x = tl.where(x > 88.0, 88.0, x)
    nf = (x * 1.44269504088896341 + 12582912.0) - 12582912.0
    r = x - nf * 0.693359375
    r = r - nf * -2.12194440e-4
    y = tl.zeros_like(x) + 1.9875691500e-4
    y = y * r + 1.3981999507e-3
    y = y * r + 8.3334519073e-3
    y = y * r + 4.1665795894e-2
    y = y * r + 1.6666665459e-1
    y = y * r + 5.0000001201e-1
    y = (y * r) * r + r + 1.0
    n = nf.to(tl.int32)
    h = n >> 1
    return (y * _pow2(h)) * _pow2(n - h)


@triton.jit
def tanh_f(x):
    """fmath.h's ``tanh_f``: an odd polynomial below ``|x| = 0.625``, ``1 - 2 / (exp(2 |x|) + 1)``
    with the sign above, 1 beyond ``|x| = 9``."""
    ax = tl.abs(x)
    z = x * x
    p = tl.zeros_like(x) + -5.70498872745e-3
    p = p * z + 2.06390887954e-2
    p = p * z + -5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z + -3.33332819422e-1
    small = (p * z) * x + x
    e = exp_f(2.0 * tl.where(ax > 9.0, 9.0, ax))
    big = 1.0 - tl.math.div_rn(tl.zeros_like(e) + 2.0, e + 1.0)
    sgn = tl.where(x < 0.0, -1.0, 1.0)
    return tl.where(ax < 0.625, small, tl.where(ax > 9.0, 1.0, big) * sgn)


@triton.jit
def _score(d, tot, lo, hi, Kf):
    """``(score, a)`` of deltas ``d`` (one model) with their sum ``tot``; min/max as std::'s."""
    a = tl.abs(d)
    a = tl.where(a < lo, lo, a)
    a = tl.where(hi < a, hi, a)
    span = hi - lo
    live = span > 0.0
    rr = tl.where(live, tl.math.div_rn(a - lo, tl.zeros_like(a) + tl.where(live, span, 1.0)), 0.0)
    return exp_f(Kf * (rr * rr)) * tanh_f(d * tot), a


@triton.jit
def _pcb_deltas(base, models, i, inb, K: tl.constexpr):
    b = tl.load(base + i, mask=inb, other=0.0).to(tl.float32)
    tot = tl.zeros(i.shape, tl.float32)
    ds = ()
    for k in tl.static_range(K):
        d = tl.load(models[k] + i, mask=inb, other=0.0).to(tl.float32) - b
        tot = tot + d
        ds = ds + (d,)
    return b, ds, tot


@triton.jit
def _pcb_scores_kernel(base, models, lohi, scores, n, K: tl.constexpr, BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    b, ds, tot = _pcb_deltas(base, models, i, inb, K)
    for k in tl.static_range(K):
        s, a = _score(ds[k], tot, tl.load(lohi + 2 * k), tl.load(lohi + 2 * k + 1), K * 1.0)
        tl.store(scores[k] + i, s, mask=inb)


@triton.jit
def _pcb_merge_kernel(base, models, out, lohi, qm, flags, n, w, lam, K: tl.constexpr, BLK: tl.constexpr):
    i, inb = block_tile(tl.program_id(0), n, BLK)
    b = tl.load(base + i, mask=inb, other=0.0).to(tl.float32)
    tl.store(flags + K, 1, mask=tl.max(bad_bits(b), axis=0) > 0)
    tot = tl.zeros(i.shape, tl.float32)
    ds = ()
    for k in tl.static_range(K):
        x = tl.load(models[k] + i, mask=inb, other=0.0).to(tl.float32)
        tl.store(flags + k, 1, mask=tl.max(bad_bits(x), axis=0) > 0)
        d = x - b
        tot = tot + d
        ds = ds + (d,)
    num = tl.zeros(i.shape, tl.float32)
    den = tl.zeros(i.shape, tl.float32)
    for k in tl.static_range(K):
        d = ds[k]
        s, a = _score(d, tot, tl.load(lohi + 2 * k), tl.load(lohi + 2 * k + 1), K * 1.0)
        q = tl.load(qm + 2 * k)
        span = tl.load(qm + 2 * k + 1) - q
        live = span > 0.0
        scale = tl.where(live, tl.math.div_rn(tl.where(s < q, q, s) - q,
                                              tl.zeros_like(s) + tl.where(live, span, 1.0)), 0.0)
        sg = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        num = num + (w[k] * (sg * a)) * scale
        den = den + scale
    o = b + lam * tl.math.div_rn(num, tl.where(den < 1e-12, 1e-12, den))
    tl.store(flags + K + 1, 1, mask=store_checked(out + i, o, inb) > 0)


def pcb_scores(base, models, lohi, *, n: int):
    """Every score, fp32 device ``[K, n]`` (model k's row k), from the clamp bounds ``lohi``."""
    K = len(models)
    scores = torch.empty(K, n, dtype=torch.float32, device=base.device)
    if n:
        BLK = block_size(K)
        _pcb_scores_kernel[(triton.cdiv(n, BLK),)](base, tuple(models), lohi, tuple(scores), n, K=K, BLK=BLK,
                                                   num_warps=4, enable_fp_fusion=False)
    return scores


def pcb_merge(base, models, out, lohi, qm, *, n: int, w, lam: float):
    """The merge pass into ``out``; returns the int32 device flags ``[K + 2]``: models, base,
    result (a stored value is inf/nan)."""
    K = len(models)
    flags = torch.zeros(K + 2, dtype=torch.int32, device=base.device)
    if n:
        BLK = block_size(K)
        _pcb_merge_kernel[(triton.cdiv(n, BLK),)](
            base, tuple(models), out, lohi, qm, flags, n, tuple(float(x) for x in w), float(lam), K=K,
            BLK=BLK, num_warps=4, enable_fp_fusion=False)
    return flags
