// ram and ramplus_tl (fastmerge/methods/ram.py, ramplus_tl.py). With d_k = m_k - base,
// nz_k = |d_k| > eps and c = sum_k nz_k:
//   ram:        out = base + (sum_k nz_k d_k) / max(c, 1)
//   ramplus_tl: out = base + sum_k (nz_k d_k) ([c = 1] lam_k + [c > 1] / c)
// ramplus_tl's lam_k comes from per-model counts over the whole tensor (ram_counts: one pass),
// computed on the host; the merge is a second pass. Sums run in model order in the reference's
// operations, so the bytes agree with it.
// No FP trap is ever observed here, so the compiler may evaluate both sides of the
// clamps and selects (if-conversion into blends): without this the loops do not vectorise.
// Values are unchanged: no fast-math, every operation stays IEEE and separately rounded.
#pragma GCC optimize("no-trapping-math")
#include "elementwise.h"

namespace fm {

namespace {

// A block's base (bb), deltas (D: K rows of EW_BLOCK) and counts c, flags in acc[flag0 ..].
struct RamBlock {
    const void* base;
    const std::vector<uint64_t>& models;
    int dt;
    float eps;

    // scratch layout: bb | c (as floats) | D_0 .. D_{K-1}
    static int64_t floats(int K) { return (int64_t)(K + 2) * EW_BLOCK; }

    void load(int64_t i0, int len, float* scratch, int64_t* flags) const {
        const int K = (int)models.size();
        float* __restrict bb = scratch;
        float* __restrict c = scratch + EW_BLOCK;
        load_block(base, dt, i0, len, bb);
        flags[K] |= ew_nonfinite(bb, len);
        for (int j = 0; j < len; ++j) c[j] = 0.0f;
        for (int k = 0; k < K; ++k) {
            float* __restrict d = scratch + (int64_t)(k + 2) * EW_BLOCK;
            load_block((const void*)models[k], dt, i0, len, d);
            flags[k] |= ew_nonfinite(d, len);
            for (int j = 0; j < len; ++j) {
                d[j] = d[j] - bb[j];
                c[j] += (float)(std::fabs(d[j]) > eps);  // exact: counts stay far below 2^24
            }
        }
    }
};

}  // namespace

std::vector<int64_t> ram_counts(uint64_t base, const std::vector<uint64_t>& models, int dt, int64_t n,
                                float eps, int nthreads) {
    const int K = (int)models.size();
    const RamBlock rb{(const void*)base, models, dt, eps};
    auto sums = ew_parallel(n, nthreads, 3 * K + 1, RamBlock::floats(K),
                            [&](int64_t i0, int len, float* s, int64_t* acc) {
        rb.load(i0, len, s, acc + 2 * K);
        const float* c = s + EW_BLOCK;
        for (int k = 0; k < K; ++k) {
            const float* d = s + (int64_t)(k + 2) * EW_BLOCK;
            int64_t shared = 0, unique = 0;
            for (int j = 0; j < len; ++j) {
                const int nz = std::fabs(d[j]) > eps;
                shared += nz & (c[j] > 1.0f);
                unique += nz & (c[j] == 1.0f);
            }
            acc[2 * k] += shared;
            acc[2 * k + 1] += unique;
        }
    });
    for (int m = 2 * K; m < 3 * K + 1; ++m) sums[m] = sums[m] != 0;
    return sums;
}

std::vector<int> ram_merge(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out,
                           int out_dt, int64_t n, float eps, const std::vector<float>& lam, int nthreads) {
    const int K = (int)models.size();
    const bool plus = !lam.empty();
    const RamBlock rb{(const void*)base, models, dt, eps};
    advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    auto sums = ew_parallel(n, nthreads, K + 2, RamBlock::floats(K) + EW_BLOCK,
                            [&](int64_t i0, int len, float* s, int64_t* acc) {
        rb.load(i0, len, s, acc);
        const float* __restrict bb = s;
        const float* __restrict c = s + EW_BLOCK;
        float* __restrict o = s + (int64_t)(K + 2) * EW_BLOCK;
        if (plus) {  // out = base; out += (d nz) w_k, w_k = lam_k where c = 1, 1 / max(c, 1) elsewhere
            for (int j = 0; j < len; ++j) o[j] = bb[j];
            for (int k = 0; k < K; ++k) {
                const float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
                const float lk = lam[k];
                for (int j = 0; j < len; ++j) {
                    const float w = c[j] == 1.0f ? lk : 1.0f / std::max(c[j], 1.0f);
                    o[j] = o[j] + (d[j] * (float)(std::fabs(d[j]) > eps)) * w;
                }
            }
        } else {  // Python's sum: 0 + nz_0 d_0 + nz_1 d_1 + ..., then one division
            for (int j = 0; j < len; ++j) o[j] = 0.0f;
            for (int k = 0; k < K; ++k) {
                const float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
                for (int j = 0; j < len; ++j) o[j] = o[j] + d[j] * (float)(std::fabs(d[j]) > eps);
            }
            for (int j = 0; j < len; ++j) o[j] = bb[j] + o[j] / std::max(c[j], 1.0f);
        }
        acc[K + 1] |= ew_nonfinite(o, len);
        stream_block((void*)out, out_dt, i0, len, o);
    });
    return ew_flags(sums, 0, K + 2);
}

}  // namespace fm
