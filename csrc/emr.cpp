// EMR-Merging (fastmerge.research.emr): one pass over base + K models writes the unified task
// vector and the packed per-task masks and sums the two per-task magnitudes the rescalers come
// from. csrc/research.h states the formulas. The sums are per block (EW_BLOCK elements, in
// double) and the blocks are added in order, so they do not depend on the thread count.
#pragma GCC optimize("no-trapping-math")  // as ram.cpp: blends instead of branches, IEEE values
#include "elementwise.h"
#include "research.h"

namespace fm {

namespace {

// sum_j |x[j] - b[j]| (the fp32 delta's magnitude) and sum_j |u[j] keep[j]|: lane_sum8's
// fp32 sums of 8 elements per lane, added in double
inline double sum_absdiff(const float* __restrict x, const float* __restrict b, int n) {
    return lane_sum8(n, [&](int j) { return std::fabs(x[j] - b[j]); });
}

inline double sum_kept(const float* __restrict u, const float* __restrict keep, int n) {
    return lane_sum8(n, [&](int j) { return std::fabs(u[j] * keep[j]); });
}

// The block with K a template constant: one loop computes the elected sign, the masks (0/1 rows
// into keep), the unified value (into u) and the flags, in the generic loops' operations.
template <int K>
inline void emr_fused(const float* __restrict b, const float* const* xs, int len, float* __restrict u,
                      float* __restrict keep, int64_t* acc) {
    const float* x[K];
    uint32_t bx[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) { x[k] = xs[k]; bx[k] = 0; }
    uint32_t bb = 0;
    for (int j = 0; j < len; ++j) {
        const float bj = b[j];
        bb |= bad_bits(bj);
        float d[K];
        const float g = deltas_at<K>(x, j, bj, d, bx) > 0.0f ? 1.0f : -1.0f;
        float top = 0.0f;
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
            const float m = (float)(d[k] * g > 0.0f);
            keep[(int64_t)k * EW_BLOCK + j] = m;
            top = std::max(top, std::fabs(d[k] * m));
        }
        u[j] = top * g;
    }
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) acc[k] |= bx[k] >> 31;
    acc[K] |= bb >> 31;
}

#ifdef __AVX2__
inline __m256 abs8(__m256 x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }

inline uint32_t any_bad8(__m256 x) {  // 1 if a lane is inf/nan
    const __m256i e = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7f800000));
    return (uint32_t)(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_set1_epi32(0x7f800000)))) != 0);
}

// emr_fused for a block of a multiple of 64 elements in registers: the masks packed as they are
// compared, the two sums as lane_sum8 forms them (fp32 lanes over 8 vectors, then double), so
// the bytes and sums equal emr_fused's + sum_absdiff / sum_kept.
template <int K>
inline void emr_avx2(const float* __restrict b, const float* const* xs, int len, float* __restrict u,
                     uint8_t* const* rows, double* p, int64_t* acc) {
    const float* x[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) x[k] = xs[k];
    alignas(32) double sa[K][8], sk[K][8];
    for (int k = 0; k < K; ++k)
        for (int l = 0; l < 8; ++l) sa[k][l] = sk[k][l] = 0.0;
    uint32_t bad[K + 1] = {0};
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), minus = _mm256_set1_ps(-1.0f);
    for (int c = 0; c < len; c += 64) {
        __m256 pa[K], pk[K];
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) pa[k] = pk[k] = zero;
        for (int j = c; j < c + 64; j += 8) {
            const __m256 bv = _mm256_loadu_ps(b + j);
            bad[K] |= any_bad8(bv);
            __m256 d[K];
            __m256 g = zero;
#pragma GCC unroll 8
            for (int k = 0; k < K; ++k) {
                const __m256 xv = _mm256_loadu_ps(x[k] + j);
                bad[k] |= any_bad8(xv);
                d[k] = _mm256_sub_ps(xv, bv);
                g = _mm256_add_ps(g, d[k]);
                pa[k] = _mm256_add_ps(pa[k], abs8(d[k]));
            }
            g = _mm256_blendv_ps(minus, one, _mm256_cmp_ps(g, zero, _CMP_GT_OQ));
            __m256 top = zero, m[K];
#pragma GCC unroll 8
            for (int k = 0; k < K; ++k) {
                m[k] = _mm256_cmp_ps(_mm256_mul_ps(d[k], g), zero, _CMP_GT_OQ);
                top = _mm256_max_ps(_mm256_and_ps(abs8(d[k]), m[k]), top);
                rows[k][j >> 3] = packed8(m[k]);
            }
            const __m256 uni = _mm256_mul_ps(top, g);
            _mm256_storeu_ps(u + j, uni);
            const __m256 au = abs8(uni);
#pragma GCC unroll 8
            for (int k = 0; k < K; ++k) pk[k] = _mm256_add_ps(pk[k], _mm256_and_ps(au, m[k]));
        }
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
            alignas(32) float fa[8], fk[8];
            _mm256_store_ps(fa, pa[k]);
            _mm256_store_ps(fk, pk[k]);
            for (int l = 0; l < 8; ++l) { sa[k][l] += (double)fa[l]; sk[k][l] += (double)fk[l]; }
        }
    }
    for (int k = 0; k < K; ++k) {
        const double* a = sa[k];
        const double* q = sk[k];
        p[k] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        p[K + k] = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
        acc[k] |= bad[k];
    }
    acc[K] |= bad[K];
}
#endif

}  // namespace

std::tuple<std::vector<double>, std::vector<double>, std::vector<int>>
emr(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t uni, uint64_t bits, int64_t n, int nthreads) {
    const int K = (int)models.size();
    const int64_t row_bytes = (n + 7) / 8;
    const int64_t nblocks = (n + EW_BLOCK - 1) / EW_BLOCK;
    std::vector<double> part((size_t)nblocks * 2 * K, 0.0);
    advise_huge((void*)uni, n * 4);
    // scratch: bb | sum | top | keep | kept values | D_0 .. D_{K-1} (fused: converted inputs) |
    // fused: keep rows K_0 .. K_{K-1}
    auto sums = ew_parallel(n, nthreads, K + 1, (int64_t)(2 * K + 5) * EW_BLOCK,
                            [&](int64_t i0, int len, float* s, int64_t* acc) {
        if (K <= 8) {
            const float* b = ew_row((const void*)base, dt, i0, len, s);
            const float* xs[8];
            for (int k = 0; k < K; ++k) xs[k] = ew_row((const void*)models[k], dt, i0, len, s + (int64_t)(k + 5) * EW_BLOCK);
            float* u = s + 2 * EW_BLOCK;
            float* keeps = s + (int64_t)(K + 5) * EW_BLOCK;
#ifdef __AVX2__
            if (len % 64 == 0) {
                uint8_t* rows[8];
                for (int k = 0; k < K; ++k) rows[k] = (uint8_t*)bits + k * row_bytes + (i0 >> 3);
                double* __restrict p = part.data() + (i0 / EW_BLOCK) * 2 * K;
                const bool done = with_k<8>(K, [&](auto kc) {
                    constexpr int KT = decltype(kc)::value;
                    if constexpr (KT > 0) {
                        emr_avx2<KT>(b, xs, len, u, rows, p, acc);
                        return true;
                    }
                    return false;
                });
                if (done) {
                    stream_block((void*)uni, DTYPE_F32, i0, len, u);
                    return;
                }
            }
#endif
            const bool done = with_k<8>(K, [&](auto kc) {
                constexpr int KT = decltype(kc)::value;
                if constexpr (KT > 0) {
                    emr_fused<KT>(b, xs, len, u, keeps, acc);
                    return true;
                }
                return false;
            });
            if (done) {
                double* __restrict p = part.data() + (i0 / EW_BLOCK) * 2 * K;
                for (int k = 0; k < K; ++k) {
                    const float* kk = keeps + (int64_t)k * EW_BLOCK;
                    p[k] = sum_absdiff(xs[k], b, len);
                    p[K + k] = sum_kept(u, kk, len);
                    pack_row(kk, len, (uint8_t*)bits + k * row_bytes, i0);
                }
                stream_block((void*)uni, DTYPE_F32, i0, len, u);
                return;
            }
        }
        float* __restrict bb = s;
        float* __restrict g = s + EW_BLOCK;
        float* __restrict top = s + 2 * EW_BLOCK;
        float* __restrict keep = s + 3 * EW_BLOCK;
        float* __restrict tmpk = s + 4 * EW_BLOCK;
        auto D = [&](int k) { return s + (int64_t)(k + 5) * EW_BLOCK; };
        double* __restrict p = part.data() + (i0 / EW_BLOCK) * 2 * K;
        load_block((const void*)base, dt, i0, len, bb);
        acc[K] |= ew_nonfinite(bb, len);
        for (int j = 0; j < len; ++j) { g[j] = 0.0f; top[j] = 0.0f; }
        for (int k = 0; k < K; ++k) {
            float* __restrict d = D(k);
            load_block((const void*)models[k], dt, i0, len, d);
            acc[k] |= ew_nonfinite(d, len);
            for (int j = 0; j < len; ++j) {
                d[j] = d[j] - bb[j];
                g[j] = g[j] + d[j];
            }
            p[k] = lane_sum8(len, [&](int j) { return std::fabs(d[j]); });
        }
        for (int j = 0; j < len; ++j) g[j] = g[j] > 0.0f ? 1.0f : -1.0f;
        for (int k = 0; k < K; ++k) {
            const float* __restrict d = D(k);
            for (int j = 0; j < len; ++j) {
                const float m = (float)(d[j] * g[j] > 0.0f);
                top[j] = std::max(top[j], std::fabs(d[j] * m));
            }
        }
        for (int j = 0; j < len; ++j) top[j] = top[j] * g[j];
        for (int k = 0; k < K; ++k) {
            const float* __restrict d = D(k);
            for (int j = 0; j < len; ++j) {
                keep[j] = (float)(d[j] * g[j] > 0.0f);
                tmpk[j] = top[j] * keep[j];
            }
            p[K + k] = lane_sum8(len, [&](int j) { return std::fabs(tmpk[j]); });
            pack_row(keep, len, (uint8_t*)bits + k * row_bytes, i0);
        }
        stream_block((void*)uni, DTYPE_F32, i0, len, top);
    });
    std::vector<double> abs_sum(K, 0.0), kept_sum(K, 0.0);
    for (int64_t b = 0; b < nblocks; ++b)
        for (int k = 0; k < K; ++k) {
            abs_sum[k] += part[(size_t)b * 2 * K + k];
            kept_sum[k] += part[(size_t)b * 2 * K + K + k];
        }
    return {abs_sum, kept_sum, ew_flags(sums, 0, K + 1)};
}

}  // namespace fm
