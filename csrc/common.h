// Shared helpers of the fastmerge CPU kernels: dtype conversion, block loads and stores,
// Philox, keys, threads and pages. The integer codes (DTYPE_*, MASK_*, ...) are abi.h's.
//
// The module does not link against libtorch: Python hands over raw data pointers of
// contiguous tensors (as bitsandbytes does), so the build needs no torch and one binary
// serves every torch version.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <type_traits>
#include <vector>

#include "abi.h"
#include "philox_mask.h"

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fm {

constexpr int BLK = 512;  // elements per block: a multiple of 64 (bit words) and 4 (Philox)

static inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half -> float, exact (normals, subnormals, inf, nan).
static inline float half_to_float(uint16_t h) {
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    const uint32_t exp = o & 0x0f800000u;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == 0x0f800000u) {
        o += (uint32_t)(128 - 16) << 23;              // inf / nan
    } else if (exp == 0) {
        o += 1u << 23;                                 // zero / subnormal: renormalise
        o = f2u(u2f(o) - 6.103515625e-05f);
    }
    return u2f(o | ((uint32_t)(h & 0x8000u) << 16));
}

// float -> IEEE half, round to nearest even, saturating to inf like a cast does.
static inline uint16_t float_to_half(float f) {
    uint32_t x = f2u(f);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint32_t o;
    if (x >= (uint32_t)(127 + 16) << 23) {
        o = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (x < (uint32_t)113 << 23) {
        const uint32_t magic = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        o = f2u(u2f(x) + u2f(magic)) - magic;         // subnormal: let the FPU round
    } else {
        const uint32_t odd = (x >> 13) & 1u;
        x += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        o = x >> 13;
    }
    return (uint16_t)(o | (sign >> 16));
}

static inline float bf16_to_float(uint16_t h) { return u2f((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet nan
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// Load n elements starting at element i0 of a tensor of dtype dt into fp32 dst.
static inline void load_block(const void* p, int dt, int64_t i0, int n, float* __restrict dst) {
    if (dt == DTYPE_F32) {
        const float* s = (const float*)p + i0;
        for (int j = 0; j < n; ++j) dst[j] = s[j];
    } else if (dt == DTYPE_BF16) {
        const uint16_t* s = (const uint16_t*)p + i0;
        for (int j = 0; j < n; ++j) dst[j] = u2f((uint32_t)s[j] << 16);
    } else {
        const uint16_t* s = (const uint16_t*)p + i0;
        int j = 0;
#ifdef __F16C__
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + j))));
#endif
        for (; j < n; ++j) dst[j] = half_to_float(s[j]);
    }
}

static inline void store_block(void* p, int dt, int64_t i0, int n, const float* __restrict src) {
    if (dt == DTYPE_F32) {
        float* d = (float*)p + i0;
        for (int j = 0; j < n; ++j) d[j] = src[j];
    } else if (dt == DTYPE_BF16) {
        uint16_t* d = (uint16_t*)p + i0;
        for (int j = 0; j < n; ++j) d[j] = float_to_bf16(src[j]);
    } else {
        uint16_t* d = (uint16_t*)p + i0;
        int j = 0;
#ifdef __F16C__
        // hardware conversion rounds to nearest even like float_to_half
        for (; j + 8 <= n; j += 8)
            _mm_storeu_si128((__m128i*)(d + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; j < n; ++j) d[j] = float_to_half(src[j]);
    }
}

// Round fp32 values to dtype dt and back (the merge's output rounding, kept in registers).
static inline void round_to(int dt, float* __restrict v, int n) {
    if (dt == DTYPE_BF16) {
        int j = 0;
#ifdef __AVX2__
        // float_to_bf16's round half to even and quiet nan, 8 lanes at a time
        const __m256i hi = _mm256_set1_epi32((int)0xffff0000u), one = _mm256_set1_epi32(1);
        const __m256i half = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x00400000);
        for (; j + 8 <= n; j += 8) {
            const __m256 x = _mm256_loadu_ps(v + j);
            const __m256i u = _mm256_castps_si256(x);
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
            const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(half, lsb)), hi);
            const __m256i nan = _mm256_or_si256(_mm256_and_si256(u, hi), quiet);
            const __m256 isnan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
            _mm256_storeu_ps(v + j, _mm256_castsi256_ps(_mm256_blendv_epi8(r, nan, _mm256_castps_si256(isnan))));
        }
#endif
        for (; j < n; ++j) v[j] = bf16_to_float(float_to_bf16(v[j]));
    } else if (dt == DTYPE_F16) {
        int j = 0;
#ifdef __F16C__
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(v + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT)));
#endif
        for (; j < n; ++j) v[j] = half_to_float(float_to_half(v[j]));
    }
}

#ifdef __AVX2__
// 8 elements from element i of a tensor of dtype dt, as fp32 (load_block for one vector)
static inline __m256 load8(const void* p, int dt, int64_t i) {
    if (dt == DTYPE_F32) return _mm256_loadu_ps((const float*)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    if (dt == DTYPE_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

// round_to of one vector, without the nan care (callers have flagged non-finite values already)
static inline __m256 round8(int dt, __m256 x) {
    if (dt == DTYPE_BF16) {
        const __m256i u = _mm256_castps_si256(x);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)),
                                                    _mm256_set1_epi32((int)0xffff0000u)));
    }
    if (dt == DTYPE_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    return x;
}
#endif

static inline float load_one(const void* p, int dt, int64_t i) {
    if (dt == DTYPE_F32) return ((const float*)p)[i];
    if (dt == DTYPE_BF16) return bf16_to_float(((const uint16_t*)p)[i]);
    return half_to_float(((const uint16_t*)p)[i]);
}

// Fill d[0..n) with the fp32 delta of input x for elements i0..i0+n-1 (bb: the base's block,
// already loaded; no base: the input itself).
static inline void load_delta(const void* base, const void* x, int dt, int64_t i0, int n,
                              const float* __restrict bb, float* __restrict d) {
    load_block(x, dt, i0, n, d);
    if (base)
        for (int j = 0; j < n; ++j) d[j] = d[j] - bb[j];
}

// ---- Philox4x32-10 (layout documented in fastmerge/philox.py) --------------------------
// The constants are the CUDA kernels' (philox_mask.h); the CPU versions below precompute the
// key schedule and vectorise across counter groups.
using fmphilox::PH_M0;
using fmphilox::PH_M1;
using fmphilox::PH_W0;
using fmphilox::PH_W1;
using fmphilox::UNIFORM_SCALE;

struct PhiloxKey { uint32_t k0[10], k1[10]; };

static inline PhiloxKey philox_key(uint64_t seed) {
    PhiloxKey k;
    uint32_t a = (uint32_t)seed, b = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) { k.k0[r] = a; k.k1[r] = b; a += PH_W0; b += PH_W1; }
    return k;
}

static inline void philox(const PhiloxKey& key, uint64_t g, uint32_t stream, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)g, c1 = (uint32_t)(g >> 32), c2 = stream, c3 = 0;
    for (int r = 0; r < 10; ++r) {
        const uint64_t p0 = (uint64_t)PH_M0 * c0;
        const uint64_t p1 = (uint64_t)PH_M1 * c2;
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ key.k0[r];
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ key.k1[r];
        c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// Uniforms u = (word >> 8) * 2^-24 of elements i0 .. i0+n-1 (i0 a multiple of 4).
// Structure-of-arrays over groups so the ten rounds vectorise across groups.
static inline void philox_uniform_block(const PhiloxKey& key, int64_t i0, int n, uint32_t stream,
                                        float* __restrict u) {
    const int ng = (n + 3) / 4;
    const uint64_t g0 = (uint64_t)i0 >> 2;
    int t = 0;
#ifdef __AVX2__
    // 8 counters per step: 32x32->64 products of even and odd lanes, blended back into hi/lo.
    const __m256i m0 = _mm256_set1_epi32((int)PH_M0), m1 = _mm256_set1_epi32((int)PH_M1);
    const __m256 sc = _mm256_set1_ps(UNIFORM_SCALE);
    for (; t + 8 <= ng; t += 8) {
        alignas(32) uint32_t lo32[8], hi32[8];
        for (int l = 0; l < 8; ++l) { const uint64_t g = g0 + (uint64_t)(t + l); lo32[l] = (uint32_t)g; hi32[l] = (uint32_t)(g >> 32); }
        __m256i c0 = _mm256_load_si256((const __m256i*)lo32), c1 = _mm256_load_si256((const __m256i*)hi32);
        __m256i c2 = _mm256_set1_epi32((int)stream), c3 = _mm256_setzero_si256();
        for (int r = 0; r < 10; ++r) {
            const __m256i pe0 = _mm256_mul_epu32(c0, m0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
            const __m256i pe1 = _mm256_mul_epu32(c2, m1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
            const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
            const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
            const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
            const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
            const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)key.k0[r]));
            const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)key.k1[r]));
            c1 = lo1; c3 = lo0; c0 = n0; c2 = n2;
        }
        // words -> uniforms, then transpose so group g's four words land at 4g .. 4g+3
        const __m256 f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c0, 8)), sc);
        const __m256 f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c1, 8)), sc);
        const __m256 f2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c2, 8)), sc);
        const __m256 f3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c3, 8)), sc);
        const __m256 t0 = _mm256_unpacklo_ps(f0, f1), t1 = _mm256_unpackhi_ps(f0, f1);
        const __m256 t2 = _mm256_unpacklo_ps(f2, f3), t3 = _mm256_unpackhi_ps(f2, f3);
        const __m256 r0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
        const __m256 r1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
        const __m256 r2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
        const __m256 r3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
        float* o = u + 4 * t;
        _mm256_storeu_ps(o + 0, _mm256_permute2f128_ps(r0, r1, 0x20));
        _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(r2, r3, 0x20));
        _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(r0, r1, 0x31));
        _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(r2, r3, 0x31));
    }
#endif
    for (; t < ng; ++t) {  // inlined and vectorised across t by the compiler in baseline builds
        uint32_t w[4];
        philox(key, g0 + (uint64_t)t, stream, w);
        for (int q = 0; q < 4; ++q) u[4 * t + q] = (float)(w[q] >> 8) * UNIFORM_SCALE;
    }
}

// Magnitude key: the fp32 bit pattern of |d| orders non-negative floats like the floats.
static inline uint32_t mag_key(float d) { return f2u(d) & 0x7fffffffu; }

static inline bool nonfinite_bits(float v) { return (f2u(v) & 0x7f800000u) == 0x7f800000u; }

// f(integral_constant<int, KT>): K as a template constant up to KMAX (4 or 8), else KT = 0 (K
// at run time): loops over K unroll into straight-line code that vectorises across elements
template <int KMAX = 4, class F>
inline auto with_k(int K, F&& f) {
    switch (K) {
        case 1: return f(std::integral_constant<int, 1>{});
        case 2: return f(std::integral_constant<int, 2>{});
        case 3: return f(std::integral_constant<int, 3>{});
        case 4: return f(std::integral_constant<int, 4>{});
        case 5: if (KMAX >= 8) return f(std::integral_constant<int, KMAX >= 8 ? 5 : 0>{}); break;
        case 6: if (KMAX >= 8) return f(std::integral_constant<int, KMAX >= 8 ? 6 : 0>{}); break;
        case 7: if (KMAX >= 8) return f(std::integral_constant<int, KMAX >= 8 ? 7 : 0>{}); break;
        case 8: if (KMAX >= 8) return f(std::integral_constant<int, KMAX >= 8 ? 8 : 0>{}); break;
        default: break;
    }
    return f(std::integral_constant<int, 0>{});
}

// ---- threads and pages -------------------------------------------------------------------
// The requested thread count, at most one thread per block of n elements.
static inline int threads_for(int requested, int64_t n) {
    int t = requested > 0 ? requested : 1;
    const int64_t blocks = (n + BLK - 1) / BLK;
    if (blocks < t) t = (int)(blocks > 1 ? blocks : 1);
    return t;
}

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// A fresh output tensor is first touched by the merge; on a 64 MB output, 4 KiB page faults
// cost as much as the merge itself. Ask for transparent huge pages on the untouched buffer of
// at least 8 MiB (a hint: ignored where THP is off, harmless where pages already exist).
inline void advise_huge(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t HP = (uintptr_t)2 << 20;
    if (bytes < (int64_t)(4 * HP)) return;
    const uintptr_t a = ((uintptr_t)p + HP - 1) & ~(HP - 1);
    const uintptr_t e = ((uintptr_t)p + (uintptr_t)bytes) & ~(HP - 1);
    if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
    (void)p; (void)bytes;
#endif
}

// store_block with non-temporal stores for an fp32 destination aligned to 32 bytes (a merge's
// fresh output is written once and not read back: streaming it skips the read-for-ownership of
// every line); other dtypes and alignments store as store_block does. Same values either way.
// A thread that streams calls stream_fence() before its stores must be visible to others.
static inline void stream_block(void* p, int dt, int64_t i0, int n, const float* __restrict src) {
#ifdef __AVX__
    float* d = (float*)p + i0;
    if (dt == DTYPE_F32 && ((uintptr_t)d & 31) == 0) {
        int j = 0;
        for (; j + 8 <= n; j += 8) _mm256_stream_ps(d + j, _mm256_loadu_ps(src + j));
        for (; j < n; ++j) d[j] = src[j];
        return;
    }
#endif
    store_block(p, dt, i0, n, src);
}

static inline void stream_fence() {
#ifdef __AVX__
    _mm_sfence();
#endif
}

}  // namespace fm
