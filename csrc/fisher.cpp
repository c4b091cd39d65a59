// Fisher merging (fastmerge.research.fisher): a pass over the K Fishers for their squared norms
// (normalize_fisher_weight), then one pass over the K models and K Fishers writing
// sum_k c_k (F_k + eps) theta_k / sum_k c_k (F_k + eps) in FusionBench's operation order.
#pragma GCC optimize("no-trapping-math")  // as ram.cpp: blends instead of branches, IEEE values
#include "elementwise.h"
#include "research.h"

namespace fm {

namespace {

// 2 if some v[0..n) is negative (-0 is not), else 0
inline int ew_negative(const float* __restrict v, int n) {
    int neg = 0;
    for (int j = 0; j < n; ++j) neg |= v[j] < 0.0f;
    return neg << 1;
}

// fisher_merge's block with K a template constant: one loop, the inputs read in place (fp32)
// or from converted rows, the flags in the loop; the same operations in the same order as the
// generic loop in fisher_merge.
template <int K>
inline void merge_fused(const float* const* x, const float* const* f, const std::vector<float>& coef, float eps,
                        int len, float* __restrict o, int64_t* acc) {
    const float* xs[K];
    const float* fs[K];
    float c[K];
    uint32_t bx[K], bf[K], nf[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) { xs[k] = x[k]; fs[k] = f[k]; c[k] = coef[k]; bx[k] = bf[k] = nf[k] = 0; }
    uint32_t bo = 0;
    for (int j = 0; j < len; ++j) {
        float num = 0.0f, den = 0.0f;
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
            const float w = fs[k][j], xv = xs[k][j];
            bf[k] |= bad_bits(w);
            nf[k] |= (uint32_t)(w < 0.0f);
            bx[k] |= bad_bits(xv);
            const float cw = c[k] * (w + eps);
            num = num + cw * xv;
            den = den + cw;
        }
        const float r = num / den;
        bo |= bad_bits(r);
        o[j] = r;
    }
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
        acc[k] |= bx[k] >> 31;
        acc[K + k] |= bf[k] >> 31;
        acc[2 * K + k] |= nf[k] << 1;
    }
    acc[3 * K] |= bo >> 31;
}

}  // namespace

std::tuple<std::vector<double>, std::vector<int>> fisher_sumsq(const std::vector<uint64_t>& fishers, int dt,
                                                              int64_t n, int nthreads) {
    const int K = (int)fishers.size();
    const int64_t nblocks = (n + EW_BLOCK - 1) / EW_BLOCK;
    std::vector<double> part((size_t)nblocks * K, 0.0);
    auto flags = ew_parallel(n, nthreads, 2 * K, EW_BLOCK, [&](int64_t i0, int len, float* s, int64_t* acc) {
        for (int k = 0; k < K; ++k) {
            const float* f = ew_row((const void*)fishers[k], dt, i0, len, s);
            uint32_t bad = 0, neg = 0;
            for (int j = 0; j < len; ++j) {
                bad |= bad_bits(f[j]);
                neg |= (uint32_t)(f[j] < 0.0f);
            }
            acc[k] |= bad >> 31;
            acc[K + k] |= neg << 1;
            part[(size_t)(i0 / EW_BLOCK) * K + k] = lane_sum8(len, [&](int j) { return f[j] * f[j]; });
        }
    });
    std::vector<double> sq(K, 0.0);
    for (int64_t b = 0; b < nblocks; ++b)
        for (int k = 0; k < K; ++k) sq[k] += part[(size_t)b * K + k];
    std::vector<int> f(K);
    for (int k = 0; k < K; ++k) f[k] = (flags[k] != 0) | (flags[K + k] != 0 ? 2 : 0);
    return {sq, f};
}

std::vector<int> fisher_merge(const std::vector<uint64_t>& models, int dt, const std::vector<uint64_t>& fishers,
                              int fdt, const std::vector<float>& coef, float eps, uint64_t out, int out_dt,
                              int64_t n, int nthreads) {
    const int K = (int)models.size();
    advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    // scratch: num | den | w | x | (fused: converted rows X_0 .. X_{K-1}, F_0 .. F_{K-1})
    const bool fused = K <= 8;
    auto sums = ew_parallel(n, nthreads, 3 * K + 1, (4 + (fused ? 2 * K : 0)) * (int64_t)EW_BLOCK,
                            [&](int64_t i0, int len, float* s, int64_t* acc) {
        if (fused) {
            const float* xs[8];
            const float* fs[8];
            for (int k = 0; k < K; ++k) {
                xs[k] = ew_row((const void*)models[k], dt, i0, len, s + (int64_t)(4 + k) * EW_BLOCK);
                fs[k] = ew_row((const void*)fishers[k], fdt, i0, len, s + (int64_t)(4 + K + k) * EW_BLOCK);
            }
            const bool done = with_k<8>(K, [&](auto kc) {
                constexpr int KT = decltype(kc)::value;
                if constexpr (KT > 0) {
                    merge_fused<KT>(xs, fs, coef, eps, len, s, acc);
                    return true;
                }
                return false;
            });
            if (done) {
                stream_block((void*)out, out_dt, i0, len, s);
                return;
            }
        }
        float* __restrict num = s;
        float* __restrict den = s + EW_BLOCK;
        float* __restrict w = s + 2 * EW_BLOCK;
        float* __restrict x = s + 3 * EW_BLOCK;
        for (int j = 0; j < len; ++j) { num[j] = 0.0f; den[j] = 0.0f; }
        for (int k = 0; k < K; ++k) {
            load_block((const void*)fishers[k], fdt, i0, len, w);
            acc[K + k] |= ew_nonfinite(w, len);
            acc[2 * K + k] |= ew_negative(w, len);
            load_block((const void*)models[k], dt, i0, len, x);
            acc[k] |= ew_nonfinite(x, len);
            const float ck = coef[k];
            for (int j = 0; j < len; ++j) {
                const float cw = ck * (w[j] + eps);
                num[j] = num[j] + cw * x[j];
                den[j] = den[j] + cw;
            }
        }
        for (int j = 0; j < len; ++j) num[j] = num[j] / den[j];
        acc[3 * K] |= ew_nonfinite(num, len);
        stream_block((void*)out, out_dt, i0, len, num);
    });
    std::vector<int> f(2 * K + 1);
    for (int k = 0; k < K; ++k) f[k] = sums[k] != 0;
    for (int k = 0; k < K; ++k) f[K + k] = (sums[K + k] != 0) | (sums[2 * K + k] != 0 ? 2 : 0);
    f[2 * K] = sums[3 * K] != 0;
    return f;
}

}  // namespace fm
