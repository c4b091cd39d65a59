// TALL masks and Consensus merging (fastmerge/methods/consensus_ta.py, consensus_ties.py,
// fastmerge.research.tall_masks): one pass over base + K models (+ a given multi-task vector),
// writing the packed masks and/or the merged tensor. csrc/research.h states the formulas.
// The TIES cuts come from select_ranges (magnitude_select.cpp), as the two-pass TIES merge's do.
#pragma GCC optimize("no-trapping-math")  // as ram.cpp: blends instead of branches, IEEE values
#include "elementwise.h"
#include "masks.h"
#include "research.h"

namespace fm {

namespace {

// t[j] = d[j] [(key, index) in the top set] for elements i0 .. i0+len-1. Where the tie cut J
// lies outside the block (all blocks but one), one 32-bit compare decides each element, as in
// masks.h's eval_mask, and the loop vectorises.
inline void trim_block(const float* __restrict d, int len, int64_t i0, const TopSet& top, float* __restrict t) {
    const int64_t last = i0 + len - 1;
    if (top.J >= last || top.J < i0) {
        const int64_t tb = top.J >= last ? top.T - 1 : top.T;
        const int32_t t32 = (int32_t)std::max<int64_t>(std::min<int64_t>(tb, INT32_MAX), -1);
        for (int j = 0; j < len; ++j) t[j] = (int32_t)mag_key(d[j]) > t32 ? d[j] : 0.0f * d[j];
    } else {
        for (int j = 0; j < len; ++j) t[j] = in_top_bits(mag_key(d[j]), i0 + j, top) ? d[j] : 0.0f * d[j];
    }
}

}  // namespace

std::vector<int> consensus(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t mtl, int mtl_dt,
                           const std::vector<int64_t>& cuts, int normalize, const std::vector<float>& lambdas,
                           int kmin, float lam, uint64_t out, int out_dt, uint64_t bits, int64_t n, int nthreads) {
    const int K = (int)models.size();
    const int64_t row_bytes = (n + 7) / 8;
    const bool ties = !cuts.empty();
    if (out) advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    // scratch: bb | mtl | count | tmp | o | D_0 .. D_{K-1} | T_0 .. T_{K-1} (TIES: trimmed)
    auto sums = ew_parallel(n, nthreads, K + 3, (int64_t)((ties ? 2 * K : K) + 5) * EW_BLOCK,
                            [&](int64_t i0, int len, float* s, int64_t* acc) {
        float* __restrict bb = s;
        float* __restrict v = s + EW_BLOCK;
        float* __restrict c = s + 2 * EW_BLOCK;
        float* __restrict tmp = s + 3 * EW_BLOCK;
        float* __restrict o = s + 4 * EW_BLOCK;
        auto D = [&](int k) { return s + (int64_t)(k + 5) * EW_BLOCK; };
        auto T = [&](int k) { return s + (int64_t)(K + k + 5) * EW_BLOCK; };
        load_block((const void*)base, dt, i0, len, bb);
        acc[K] |= ew_nonfinite(bb, len);
        for (int k = 0; k < K; ++k) {
            float* __restrict d = D(k);
            load_block((const void*)models[k], dt, i0, len, d);
            acc[k] |= ew_nonfinite(d, len);
            for (int j = 0; j < len; ++j) d[j] = d[j] - bb[j];
        }
        if (mtl) {
            load_block((const void*)mtl, mtl_dt, i0, len, v);
            acc[K + 1] |= ew_nonfinite(v, len);
        } else if (!ties) {  // Python's sum: 0 + d_0 + d_1 + ...
            for (int j = 0; j < len; ++j) v[j] = 0.0f;
            for (int k = 0; k < K; ++k) {
                const float* __restrict d = D(k);
                for (int j = 0; j < len; ++j) v[j] = v[j] + d[j];
            }
        } else {
            // the trimmed t_k = d_k [kept] (T_k rows) summed (tmp), the sign elected, the
            // agreeing t_k summed (v) and counted (c)
            for (int j = 0; j < len; ++j) tmp[j] = 0.0f;
            for (int k = 0; k < K; ++k) {
                trim_block(D(k), len, i0, TopSet{cuts[2 * k], cuts[2 * k + 1]}, T(k));
                const float* __restrict t = T(k);
                for (int j = 0; j < len; ++j) tmp[j] = tmp[j] + t[j];
            }
            for (int j = 0; j < len; ++j) { v[j] = 0.0f; c[j] = 0.0f; }
            for (int k = 0; k < K; ++k) {
                const float* __restrict t = T(k);
                for (int j = 0; j < len; ++j) {
                    const float agree = (float)(tmp[j] >= 0.0f ? t[j] > 0.0f : t[j] < 0.0f);
                    v[j] = v[j] + t[j] * agree;
                    c[j] = c[j] + agree;
                }
            }
            if (normalize)
                for (int j = 0; j < len; ++j) v[j] = v[j] / std::max(c[j], 1.0f);
        }
        // the TALL masks, counted in c
        for (int j = 0; j < len; ++j) c[j] = 0.0f;
        for (int k = 0; k < K; ++k) {
            const float* __restrict d = D(k);
            const float lk = lambdas[k];
            for (int j = 0; j < len; ++j) {
                const float m = (float)(std::fabs(d[j]) > lk * std::fabs(v[j] - d[j]));
                tmp[j] = m;
                c[j] = c[j] + m;
            }
            if (bits) pack_row(tmp, len, (uint8_t*)bits + k * row_bytes, i0);
        }
        if (out) {
            const float kf = (float)kmin;
            for (int j = 0; j < len; ++j) o[j] = bb[j] + lam * (v[j] * (float)(c[j] >= kf));
            acc[K + 2] |= ew_nonfinite(o, len);
            stream_block((void*)out, out_dt, i0, len, o);
        }
    });
    return ew_flags(sums, 0, K + 3);
}

}  // namespace fm
