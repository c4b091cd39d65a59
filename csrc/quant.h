// The quantizers' format arithmetic, inline for quant.cpp's tile loops: rounding, group
// min/max, INT4 group parameters, codes and packing, FP8 encoding and scales.
//
// Formats and the torch reference that defines them: fastmerge/quant.py. In short, for a
// weight [rows = out features, cols = in features]:
//   INT4 GPTQ v1   : groups of G along cols; fp16 scale; integer zero stored as zero - 1;
//                    q = clamp(round(x / s) + z, 0, 15); qweight packs 8 codes of one row
//                    (consecutive k) into an int32 of column n, element k at bits 4 (k % 8).
//   INT4 torchao   : torchao's plain Int4Tensor (mslk's int4_row_quantize_zp + pack_int4):
//                    q = clamp(round((x - min) / s), 0, 15) - 8, float zero = min + 8 s,
//                    two codes per byte along cols, the even element in the low nibble.
//   FP8            : s = amax / fmax (in the weight's dtype, stored fp32), q = fp8(clamp(x / s,
//                    -fmax, fmax)), per tensor, row or block.
// Rounding is round-half-to-even everywhere, and every float operation is the reference's,
// in the same order (no FMA: -ffp-contract=off), so the codes and scales agree bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

namespace fm {

// round half to even for |v| < 2^22 (every quantizer argument here lies within +-16.5)
constexpr float RNE_MAGIC = 12582912.0f;  // 1.5 * 2^23
static inline float rne(float v) { return (v + RNE_MAGIC) - RNE_MAGIC; }

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

#if defined(__AVX2__) && defined(__FMA__)
// a / b for b > 0, bit for bit the division's result (up to the sign of a zero), without the
// division, which costs more than the rest of a quantizer: q = a * (1/b) is within an ulp of
// a / b, the FMA residual a - q b is exact, and q + residual * (1/b) rounds to RN(a / b)
// (Markstein's theorem; also checked against the division on 3.2e8 pairs, ties included).
static inline __m256 div_exact(__m256 a, __m256 b, __m256 inv_b) {
    const __m256 q = _mm256_mul_ps(a, inv_b);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(q, b, a), inv_b, q);
}
#endif

#ifdef __AVX2__
static inline __m256 rne8(__m256 v) {
    const __m256 m = _mm256_set1_ps(RNE_MAGIC);
    return _mm256_sub_ps(_mm256_add_ps(v, m), m);
}
#endif

static inline void store_one(uint64_t p, int dt, int64_t i, float v) {
    if (dt == DTYPE_F32) ((float*)p)[i] = v;
    else if (dt == DTYPE_BF16) ((uint16_t*)p)[i] = float_to_bf16(v);
    else ((uint16_t*)p)[i] = float_to_half(v);
}

// min and max of x[0..n), and whether any value is inf or nan (min/max alone can miss a nan).
// The quantizers' only reduction pass, so non-finite values cost no pass of their own.
static inline void min_max(const float* __restrict x, int n, float& mn, float& mx, uint32_t& nonfinite) {
    float a = x[0], b = x[0];
    uint32_t nf = 0;
    int j = 0;
#ifdef __AVX2__
    if (n >= 8) {
        // two independent accumulator chains, so min/max latency does not serialise the loop
        const __m256i em = _mm256_set1_epi32(0x7f800000);
        __m256 va = _mm256_loadu_ps(x), vb = va, va2 = va, vb2 = va;
        __m256i vn = _mm256_setzero_si256(), vn2 = vn;
        for (; j + 16 <= n; j += 16) {
            const __m256 v = _mm256_loadu_ps(x + j), v2 = _mm256_loadu_ps(x + j + 8);
            va = _mm256_min_ps(va, v);
            vb = _mm256_max_ps(vb, v);
            va2 = _mm256_min_ps(va2, v2);
            vb2 = _mm256_max_ps(vb2, v2);
            vn = _mm256_or_si256(vn, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), em), em));
            vn2 = _mm256_or_si256(vn2, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v2), em), em));
        }
        for (; j + 8 <= n; j += 8) {
            const __m256 v = _mm256_loadu_ps(x + j);
            va = _mm256_min_ps(va, v);
            vb = _mm256_max_ps(vb, v);
            vn = _mm256_or_si256(vn, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), em), em));
        }
        va = _mm256_min_ps(va, va2);
        vb = _mm256_max_ps(vb, vb2);
        vn = _mm256_or_si256(vn, vn2);
        __m128 ha = _mm_min_ps(_mm256_castps256_ps128(va), _mm256_extractf128_ps(va, 1));
        __m128 hb = _mm_max_ps(_mm256_castps256_ps128(vb), _mm256_extractf128_ps(vb, 1));
        ha = _mm_min_ps(ha, _mm_movehl_ps(ha, ha));
        hb = _mm_max_ps(hb, _mm_movehl_ps(hb, hb));
        a = _mm_cvtss_f32(_mm_min_ss(ha, _mm_shuffle_ps(ha, ha, 1)));
        b = _mm_cvtss_f32(_mm_max_ss(hb, _mm_shuffle_ps(hb, hb, 1)));
        nf = (uint32_t)!_mm256_testz_si256(vn, vn);
    }
#endif
    for (; j < n; ++j) {
        a = x[j] < a ? x[j] : a;
        b = x[j] > b ? x[j] : b;
        nf |= (uint32_t)nonfinite_bits(x[j]);
    }
    mn = a;
    mx = b;
    nonfinite |= nf;
}

#ifdef __AVX2__
// op-reduction of each of 8 vectors, as the 8 lanes of one: a transposed tree (pairs within
// 128-bit lanes, then quads, then the two halves), ~21 instructions for 8 reductions
template <class Op>
static inline __m256 reduce8(const __m256* v, Op op) {
    auto pairs = [&](__m256 a, __m256 b) { return op(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b)); };
    auto quads = [&](__m256 a, __m256 b) {
        return op(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    };
    const __m256 lo = quads(pairs(v[0], v[1]), pairs(v[2], v[3])), hi = quads(pairs(v[4], v[5]), pairs(v[6], v[7]));
    return op(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
#endif

// min and max of each of n <= 8 groups of G (a multiple of 16) values of x, into mn[0..8) and
// mx[0..8) (lanes past n: the harmless group [-1, 1]), and whether any value is inf or nan.
// The AVX2 version stores the 8 results as whole vectors: the parameter step loads them as
// vectors, and 8 scalar stores would not forward to that load (measured: a stall costing ~8%
// of the fused merge + INT4 pass).
static inline void groups_min_max8(const float* __restrict x, int n, int G, float* mn, float* mx, uint32_t& nonfinite) {
#ifdef __AVX2__
    if (G % 16 == 0) {
        __m256 vmn[8], vmx[8];
        __m256 nan = _mm256_setzero_ps();
        for (int g = 0; g < 8; ++g) {
            if (g >= n) {
                vmn[g] = _mm256_set1_ps(-1.0f);
                vmx[g] = _mm256_set1_ps(1.0f);
                continue;
            }
            const float* p = x + (int64_t)g * G;
            __m256 a = _mm256_loadu_ps(p), a2 = _mm256_loadu_ps(p + 8), b = a, b2 = a2;
            __m256 u = _mm256_cmp_ps(a, a2, _CMP_UNORD_Q);  // one compare finds a nan in either
            for (int j = 16; j < G; j += 16) {
                const __m256 v = _mm256_loadu_ps(p + j), v2 = _mm256_loadu_ps(p + j + 8);
                a = _mm256_min_ps(a, v);
                b = _mm256_max_ps(b, v);
                a2 = _mm256_min_ps(a2, v2);
                b2 = _mm256_max_ps(b2, v2);
                u = _mm256_or_ps(u, _mm256_cmp_ps(v, v2, _CMP_UNORD_Q));
            }
            vmn[g] = _mm256_min_ps(a, a2);
            vmx[g] = _mm256_max_ps(b, b2);
            nan = _mm256_or_ps(nan, u);
        }
        const __m256 rmn = reduce8(vmn, [](__m256 a, __m256 b) { return _mm256_min_ps(a, b); });
        const __m256 rmx = reduce8(vmx, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); });
        // an inf is its group's min or max
        const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
        const __m256 bad = _mm256_or_ps(_mm256_or_ps(nan, _mm256_cmp_ps(rmx, inf, _CMP_EQ_OQ)),
                                        _mm256_cmp_ps(rmn, _mm256_sub_ps(_mm256_setzero_ps(), inf), _CMP_EQ_OQ));
        nonfinite |= (uint32_t)(_mm256_movemask_ps(bad) != 0);
        _mm256_storeu_ps(mn, rmn);
        _mm256_storeu_ps(mx, rmx);
        return;
    }
#endif
    for (int g = 0; g < 8; ++g) {
        if (g < n) {
            min_max(x + (int64_t)g * G, G, mn[g], mx[g], nonfinite);
        } else {
            mn[g] = -1.0f;
            mx[g] = 1.0f;
        }
    }
}

static inline float amax_of(const float* __restrict x, int n, uint32_t& nonfinite) {
    float mn, mx;
    min_max(x, n, mn, mx, nonfinite);
    return std::max(std::fabs(mn), std::fabs(mx));
}

// ---- INT4 groups -------------------------------------------------------------------------
// Codes c[0..n) (0..15) two per byte, the even element in the low nibble, XOR flip. Eight codes
// so packed are, read as a little-endian uint32, exactly a GPTQ qweight word.
static inline void pack_pairs(const uint8_t* __restrict c, int n, uint8_t flip, uint8_t* __restrict out) {
    for (int k = 0; k < n / 2; ++k) out[k] = (uint8_t)((c[2 * k] | (c[2 * k + 1] << 4)) ^ flip);
}
// fp16 scale bits: 0 becomes the smallest subnormal (a group of tiny values must not divide
// by zero); inf is reported (values beyond 15 * 65504 do not fit GPTQ's fp16 scales).
static inline uint16_t half_scale(float s, uint32_t& overflow) {
    uint16_t h = float_to_half(s);
    if ((h & 0x7fffu) == 0) h = 1;
    overflow |= (uint32_t)((h & 0x7c00u) == 0x7c00u);
    return h;
}

// Group parameters from the groups' min and max, n groups at a time (8 per vector): the scalar
// versions define them, the AVX2 + F16C versions repeat them lane by lane.
//
// GPTQ v1 (AutoGPTQ's quantizer with min <= 0 <= max): fp16 scale bits sh, the scale sf they
// hold and the zero zf (1..15; v1 stores zero - 1, so a zero of 0 takes scale max / 14, zero 1).
static inline void gptq_param(float mn, float mx, bool sym, uint16_t& sh, float& sf, float& zf, uint32_t& overflow) {
    if (sym) {
        float amax = std::max(std::fabs(mn), std::fabs(mx));
        if (amax == 0.0f) amax = 1.0f;
        sh = half_scale((amax + amax) / 15.0f, overflow);
        sf = half_to_float(sh);
        zf = 8.0f;
        return;
    }
    float lo = mn < 0.0f ? mn : 0.0f, hi = mx > 0.0f ? mx : 0.0f;
    if (lo == hi) { lo = -1.0f; hi = 1.0f; }
    sh = half_scale((hi - lo) / 15.0f, overflow);
    sf = half_to_float(sh);
    zf = std::min(rne(-lo / sf), 15.0f);
    if (zf == 0.0f) {
        sh = half_scale(hi / 14.0f, overflow);
        sf = half_to_float(sh);
        zf = 1.0f;
    }
}

#if defined(__AVX2__) && defined(__F16C__)
// half_scale of 8 lanes; overflow counts only the lanes in `lanes` (16-bit mask)
static inline __m128i half_scale8(__m256 s, __m128i lanes, uint32_t& overflow) {
    __m128i h = _mm256_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT);  // round half to even, like float_to_half
    const __m128i zero = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7fff)), _mm_setzero_si128());
    h = _mm_blendv_epi8(h, _mm_set1_epi16(1), zero);
    const __m128i e = _mm_set1_epi16(0x7c00);
    overflow |= (uint32_t)(_mm_movemask_epi8(_mm_and_si128(_mm_cmpeq_epi16(_mm_and_si128(h, e), e), lanes)) != 0);
    return h;
}

static inline __m128i mask16(__m256 m) {
    const __m256i i = _mm256_castps_si256(m);
    return _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
}
#endif

static inline void gptq_params(const float* mn, const float* mx, int64_t n, bool sym, uint16_t* sh, float* sf,
                        float* zf, uint32_t& overflow) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), f15 = _mm256_set1_ps(15.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m128i all = _mm_set1_epi16(-1);
    for (; i + 8 <= n; i += 8) {
        const __m256 vmn = _mm256_loadu_ps(mn + i), vmx = _mm256_loadu_ps(mx + i);
        __m128i h;
        __m256 vsf, vzf;
        if (sym) {
            __m256 amax = _mm256_max_ps(_mm256_andnot_ps(sign, vmn), _mm256_andnot_ps(sign, vmx));
            amax = _mm256_blendv_ps(amax, one, _mm256_cmp_ps(amax, zero, _CMP_EQ_OQ));
            h = half_scale8(_mm256_div_ps(_mm256_add_ps(amax, amax), f15), all, overflow);
            vsf = _mm256_cvtph_ps(h);
            vzf = _mm256_set1_ps(8.0f);
        } else {
            __m256 lo = _mm256_blendv_ps(zero, vmn, _mm256_cmp_ps(vmn, zero, _CMP_LT_OQ));
            __m256 hi = _mm256_blendv_ps(zero, vmx, _mm256_cmp_ps(vmx, zero, _CMP_GT_OQ));
            const __m256 both = _mm256_cmp_ps(lo, hi, _CMP_EQ_OQ);
            lo = _mm256_blendv_ps(lo, _mm256_set1_ps(-1.0f), both);
            hi = _mm256_blendv_ps(hi, one, both);
            h = half_scale8(_mm256_div_ps(_mm256_sub_ps(hi, lo), f15), all, overflow);
            vsf = _mm256_cvtph_ps(h);
            vzf = rne8(_mm256_div_ps(_mm256_xor_ps(lo, sign), vsf));
            vzf = _mm256_blendv_ps(vzf, f15, _mm256_cmp_ps(f15, vzf, _CMP_LT_OQ));
            const __m256 z0 = _mm256_cmp_ps(vzf, zero, _CMP_EQ_OQ);
            if (_mm256_movemask_ps(z0)) {
                const __m128i m16 = mask16(z0);
                const __m128i h2 = half_scale8(_mm256_div_ps(hi, _mm256_set1_ps(14.0f)), m16, overflow);
                h = _mm_blendv_epi8(h, h2, m16);
                vsf = _mm256_blendv_ps(vsf, _mm256_cvtph_ps(h2), z0);
                vzf = _mm256_blendv_ps(vzf, one, z0);
            }
        }
        _mm_storeu_si128((__m128i*)(sh + i), h);
        _mm256_storeu_ps(sf + i, vsf);
        _mm256_storeu_ps(zf + i, vzf);
    }
#endif
    for (; i < n; ++i) gptq_param(mn[i], mx[i], sym, sh[i], sf[i], zf[i], overflow);
}

// torchao plain int4 (mslk's int4_row_quantize_zp / int4_row_quantize): scale s, float zero zp
static inline void torchao_params(const float* mn, const float* mx, int64_t n, bool sym, float* s, float* zp) {
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 e6 = _mm256_set1_ps(1e-6f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 vmn = _mm256_loadu_ps(mn + i), vmx = _mm256_loadu_ps(mx + i);
        if (sym) {
            const __m256 amax = _mm256_max_ps(_mm256_andnot_ps(sign, vmn), _mm256_andnot_ps(sign, vmx));
            _mm256_storeu_ps(s + i, _mm256_div_ps(_mm256_blendv_ps(amax, e6, _mm256_cmp_ps(amax, e6, _CMP_LT_OQ)),
                                                  _mm256_set1_ps(8.0f)));
            _mm256_storeu_ps(zp + i, _mm256_setzero_ps());
        } else {
            const __m256 range = _mm256_sub_ps(vmx, vmn);
            const __m256 vs = _mm256_div_ps(_mm256_blendv_ps(range, e6, _mm256_cmp_ps(range, e6, _CMP_LT_OQ)),
                                            _mm256_set1_ps(15.0f));
            _mm256_storeu_ps(s + i, vs);
            _mm256_storeu_ps(zp + i, _mm256_add_ps(vmn, _mm256_mul_ps(vs, _mm256_set1_ps(8.0f))));
        }
    }
#endif
    for (; i < n; ++i) {
        if (sym) {
            const float amax = std::max(std::fabs(mn[i]), std::fabs(mx[i]));
            s[i] = (amax < 1e-6f ? 1e-6f : amax) / 8.0f;
            zp[i] = 0.0f;
        } else {
            const float range = mx[i] - mn[i];
            s[i] = (range < 1e-6f ? 1e-6f : range) / 15.0f;
            zp[i] = mn[i] + s[i] * 8.0f;
        }
    }
}

// Codes of one group, packed two per byte into pk. code = clamp(round((x - off) / s) + add, 0, 15):
// GPTQ: off 0, add = zero; torchao asym: off = min, add 0; torchao sym: off 0, add 8 (that is
// clamp(round(x / s), -8, 7) + 8). torchao stores the nibbles of q = code - 8 (flip 0x88).
static inline void group_codes(const float* __restrict x, int G, float s, float off, float add, uint8_t flip,
                        uint8_t* __restrict pk) {
#if defined(__AVX2__) && defined(__FMA__)
    // integers all the way, 32 codes per step: cvtps rounds half to even (MXCSR default) like
    // rne(); packs / packus / min_epu8 clamp to 0..15; maddubs pairs the nibbles; one unpack
    // undoes the packs' lane order
    const __m256 vs = _mm256_set1_ps(s), vr = _mm256_set1_ps(1.0f / s), voff = _mm256_set1_ps(off);
    const __m256i vadd = _mm256_set1_epi32((int)add);
    const __m256i fifteen = _mm256_set1_epi8(15), pair = _mm256_set1_epi16(0x1001);
    const __m128i vflip = _mm_set1_epi8((char)flip);
    const bool sub = off != 0.0f;  // x - 0 is x: GPTQ and symmetric torchao skip the subtraction
    auto codes8 = [&](const float* p) {
        const __m256 x = _mm256_loadu_ps(p);
        return _mm256_add_epi32(_mm256_cvtps_epi32(div_exact(sub ? _mm256_sub_ps(x, voff) : x, vs, vr)), vadd);
    };
    for (int j = 0; j < G; j += 32) {  // G is a multiple of 32
        // int16 per lane: lane 0 holds elements 0-3 8-11, 16-19 24-27 of the 32; lane 1 the rest
        const __m256i p0 = _mm256_packs_epi32(codes8(x + j), codes8(x + j + 8));
        const __m256i p1 = _mm256_packs_epi32(codes8(x + j + 16), codes8(x + j + 24));
        // bytes, lane 0: 0-3 8-11 16-19 24-27, lane 1: 4-7 12-15 20-23 28-31; clamped to 0..15
        const __m256i c = _mm256_min_epu8(_mm256_packus_epi16(p0, p1), fifteen);
        // c[2k] + 16 c[2k+1] as int16, then bytes: lane 0 (01 23)(89 ab)..., lane 1 (45 67)(cd ef)...
        const __m256i nib = _mm256_maddubs_epi16(c, pair);
        const __m256i b = _mm256_packus_epi16(nib, nib);
        // interleaving the lanes' 16-bit units restores the element order
        const __m128i out = _mm_unpacklo_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        _mm_storeu_si128((__m128i*)(pk + j / 2), _mm_xor_si128(out, vflip));
    }
#else
    alignas(64) uint8_t c[BLK];
    for (int j = 0; j < G; ++j) c[j] = (uint8_t)(int)clampf(rne((x[j] - off) / s) + add, 0.0f, 15.0f);
    pack_pairs(c, G, flip, pk);
#endif
}

// qweight words of one tile: words[r * stride + k8] (row r's packed bytes read as uint32) go
// to qw[k8 * R + r], r < tr, k8 < n8. 8 x 8 blocks are transposed in registers and stored as
// 32 contiguous bytes.
static inline void store_transposed(const uint8_t* words, int64_t stride, int tr, int64_t n8, uint32_t* qw, int64_t R) {
    int64_t k8 = 0;
#ifdef __AVX2__
    if (tr % 8 == 0) {
        for (; k8 + 8 <= n8; k8 += 8) {
            for (int r = 0; r < tr; r += 8) {
                __m256i m[8];
                for (int i = 0; i < 8; ++i)
                    m[i] = _mm256_loadu_si256((const __m256i*)(words + (r + i) * stride + 4 * k8));
                // 8 x 8 transpose of 32-bit lanes
                const __m256i t0 = _mm256_unpacklo_epi32(m[0], m[1]), t1 = _mm256_unpackhi_epi32(m[0], m[1]);
                const __m256i t2 = _mm256_unpacklo_epi32(m[2], m[3]), t3 = _mm256_unpackhi_epi32(m[2], m[3]);
                const __m256i t4 = _mm256_unpacklo_epi32(m[4], m[5]), t5 = _mm256_unpackhi_epi32(m[4], m[5]);
                const __m256i t6 = _mm256_unpacklo_epi32(m[6], m[7]), t7 = _mm256_unpackhi_epi32(m[6], m[7]);
                const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
                const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
                const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
                const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
                const __m256i o[8] = {
                    _mm256_permute2x128_si256(u0, u4, 0x20), _mm256_permute2x128_si256(u1, u5, 0x20),
                    _mm256_permute2x128_si256(u2, u6, 0x20), _mm256_permute2x128_si256(u3, u7, 0x20),
                    _mm256_permute2x128_si256(u0, u4, 0x31), _mm256_permute2x128_si256(u1, u5, 0x31),
                    _mm256_permute2x128_si256(u2, u6, 0x31), _mm256_permute2x128_si256(u3, u7, 0x31)};
                for (int i = 0; i < 8; ++i) _mm256_storeu_si256((__m256i*)(qw + (k8 + i) * R + r), o[i]);
            }
        }
    }
#endif
    for (; k8 < n8; ++k8)
        for (int r = 0; r < tr; ++r) std::memcpy(qw + k8 * R + r, words + r * stride + 4 * k8, 4);
}

// ---- FP8 -------------------------------------------------------------------------------------
// fp32 -> fp8 with MB mantissa bits and exponent bias BIAS, round to nearest even; |x| must not
// exceed the format's max (the caller clamps: eager casts do not saturate). Bit-exact with
// torch's cast (c10's fp8 conversions).
template <int MB, int BIAS>
static inline uint8_t fp8_encode(float x) {
    uint32_t u = f2u(x);
    const uint32_t sign = (u >> 24) & 0x80u;
    u &= 0x7fffffffu;
    // zero or subnormal: a multiple of 2^(1 - BIAS - MB); scale by the inverse (exact) and let
    // the FPU round to an integer
    // (the integer is read off the bits of v + 1.5 * 2^23, as the AVX2 encoder does)
    constexpr float up = (float)(1u << (BIAS - 1 + MB));
    const uint32_t sub = f2u(u2f(u) * up + RNE_MAGIC) - f2u(RNE_MAGIC);
    // normal: round the mantissa to MB bits (carry into the exponent is right), rebias
    const uint32_t odd = (u >> (23 - MB)) & 1u;
    const uint32_t nrm = ((u + ((1u << (22 - MB)) - 1u) + odd) >> (23 - MB)) - ((uint32_t)(127 - BIAS) << MB);
    const uint32_t is_sub = 0u - (uint32_t)(u < ((uint32_t)(127 + 1 - BIAS) << 23));
    return (uint8_t)(sign | (sub & is_sub) | (nrm & ~is_sub));
}

static inline float fp8_max(int fmt) { return fmt == FP8_FORMAT_E4M3FN ? 448.0f : 57344.0f; }

// A dequant scale amax / fmax evaluated in the weight's dtype dt (torchao and compressed-tensors
// divide in the weight's dtype: a bf16 weight gets a bf16-valued scale), stored as fp32. 0 (an
// all-zero tile) becomes fp32 epsilon, as compressed-tensors does, so the codes are zeros, not 0/0.
static inline float fp8_scale(float amax, float fmax, int dt) {
    float s = amax / fmax;
    round_to(dt, &s, 1);
    return s == 0.0f ? 1.1920928955078125e-07f : s;
}

#ifdef __AVX2__
// fp8_encode of 8 lanes of v = clamp(x / s): the same integer steps, in 32-bit lanes.
template <int MB, int BIAS>
static inline void fp8_encode8(const float* x, __m256 vs, __m256 inv, __m256 lo, __m256 hi, uint8_t* out) {
    const __m256 xv = _mm256_loadu_ps(x);
#ifdef __FMA__
    // x / s; the sign of x restores -0 / s = -0 (s > 0, so nonzero quotients have it already)
    const __m256 quot = _mm256_or_ps(div_exact(xv, vs, inv), _mm256_and_ps(xv, _mm256_set1_ps(-0.0f)));
#else
    const __m256 quot = _mm256_div_ps(xv, vs);
    (void)inv;
#endif
    const __m256 v = _mm256_min_ps(_mm256_max_ps(quot, lo), hi);
    const __m256i all = _mm256_castps_si256(v);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(all, 24), _mm256_set1_epi32(0x80));
    const __m256i u = _mm256_and_si256(all, _mm256_set1_epi32(0x7fffffff));
    const __m256 magic = _mm256_set1_ps(RNE_MAGIC);
    const __m256i sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(_mm256_mul_ps(_mm256_castsi256_ps(u),
                                                        _mm256_set1_ps((float)(1u << (BIAS - 1 + MB)))), magic)),
        _mm256_castps_si256(magic));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 23 - MB), _mm256_set1_epi32(1));
    const __m256i nrm = _mm256_sub_epi32(
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32((1 << (22 - MB)) - 1)), odd), 23 - MB),
        _mm256_set1_epi32((127 - BIAS) << MB));
    const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32((127 + 1 - BIAS) << 23), u);
    const __m256i code = _mm256_or_si256(sign, _mm256_blendv_epi8(nrm, sub, is_sub));
    const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64((__m128i*)out, _mm_packus_epi16(w16, w16));
}
#endif

template <int MB, int BIAS>
static inline void fp8_encode_n(const float* __restrict x, int n, float s, float fmax, uint8_t* __restrict out) {
    int j = 0;
#ifdef __AVX2__
    const __m256 vs = _mm256_set1_ps(s), inv = _mm256_set1_ps(1.0f / s);
    const __m256 lo = _mm256_set1_ps(-fmax), hi = _mm256_set1_ps(fmax);
    for (; j + 8 <= n; j += 8) fp8_encode8<MB, BIAS>(x + j, vs, inv, lo, hi, out + j);
#endif
    for (; j < n; ++j) out[j] = fp8_encode<MB, BIAS>(clampf(x[j] / s, -fmax, fmax));
}

static inline void fp8_encode_block(const float* __restrict x, int n, float s, int fmt, uint8_t* __restrict out) {
    if (fmt == FP8_FORMAT_E4M3FN) fp8_encode_n<3, 7>(x, n, s, fp8_max(fmt), out);
    else fp8_encode_n<2, 15>(x, n, s, fp8_max(fmt), out);
}

}  // namespace fm
