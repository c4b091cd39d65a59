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

// The TA pass with K a template constant, one loop over a block's elements: the inputs read in
// place (fp32; converted rows for fp16/bf16), the sum (or the given mtl row `mt`), the masks
// (written as 0/1 rows into keep when KEEP) and their count, the merged value into o when OUT.
// The same fp32 operations in the same order as the block path below, so the same bytes.
// TIES (1: disjoint sum, 2: mean): the multi-task vector is TIES' instead, each model trimmed
// by the 32-bit key compare key > t32[k] (the block lies off every tie cut, see trim_block).
template <int K, bool MT, bool KEEP, bool OUT, int TIES = 0>
inline void ta_fused(const float* __restrict b, const float* const* xs, const float* __restrict mt,
                     const std::vector<float>& lambdas, float kf, float lam, int len, float* __restrict o,
                     float* __restrict keep, int64_t* acc, const int32_t* t32 = nullptr) {
    const float* x[K];
    float lk[K];
    uint32_t bx[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) { x[k] = xs[k]; lk[k] = lambdas[k]; bx[k] = 0; }
    uint32_t bb = 0, bm = 0, bo = 0;
    for (int j = 0; j < len; ++j) {
        const float bj = b[j];
        bb |= bad_bits(bj);
        float d[K];
        float v = deltas_at<K>(x, j, bj, d, bx);
        if (MT) {
            v = mt[j];
            bm |= bad_bits(v);
        }
        if (TIES) {  // consensus_ties: t_k = d_k [kept], the sign of their sum, the agreeing sum
            float t[K];
            float sum = 0.0f;
#pragma GCC unroll 8
            for (int k = 0; k < K; ++k) {
                t[k] = (int32_t)mag_key(d[k]) > t32[k] ? d[k] : 0.0f * d[k];
                sum = sum + t[k];
            }
            float agreed = 0.0f, count = 0.0f;
#pragma GCC unroll 8
            for (int k = 0; k < K; ++k) {
                const float a = (float)(sum >= 0.0f ? t[k] > 0.0f : t[k] < 0.0f);
                agreed = agreed + t[k] * a;
                count = count + a;
            }
            v = TIES == 2 ? agreed / std::max(count, 1.0f) : agreed;
        }
        float c = 0.0f;
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
            const float m = (float)(std::fabs(d[k]) > lk[k] * std::fabs(v - d[k]));
            if (KEEP) keep[(int64_t)k * EW_BLOCK + j] = m;
            c = c + m;
        }
        if (OUT) {
            const float r = bj + lam * (v * (float)(c >= kf));
            bo |= bad_bits(r);
            o[j] = r;
        }
    }
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) acc[k] |= bx[k] >> 31;
    acc[K] |= bb >> 31;
    acc[K + 1] |= bm >> 31;
    acc[K + 2] |= bo >> 31;
}

}  // namespace

std::vector<int> consensus(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t mtl, int mtl_dt,
                           const std::vector<int64_t>& cuts, int normalize, const std::vector<float>& lambdas,
                           int kmin, float lam, uint64_t out, int out_dt, uint64_t bits, int64_t n, int nthreads) {
    const int K = (int)models.size();
    const int64_t row_bytes = (n + 7) / 8;
    const bool ties = !cuts.empty();
    if (out) advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    // scratch: bb | mtl | count | tmp | o | D_0 .. D_{K-1} | T_0 .. T_{K-1} (TIES: trimmed; the
    // fused TA pass: the masks to pack)
    auto sums = ew_parallel(n, nthreads, K + 3, (int64_t)(2 * K + 5) * EW_BLOCK,
                            [&](int64_t i0, int len, float* s, int64_t* acc) {
        float* __restrict bb = s;
        float* __restrict v = s + EW_BLOCK;
        float* __restrict c = s + 2 * EW_BLOCK;
        float* __restrict tmp = s + 3 * EW_BLOCK;
        float* __restrict o = s + 4 * EW_BLOCK;
        auto D = [&](int k) { return s + (int64_t)(k + 5) * EW_BLOCK; };
        auto T = [&](int k) { return s + (int64_t)(K + k + 5) * EW_BLOCK; };
        // consensus_ties' fused pass: every model's tie cut outside this block (all blocks but a
        // few), so a 32-bit compare trims each model
        int32_t t32[8];
        bool off_cuts = ties && K <= 8 && out && !mtl && !bits;
        for (int k = 0; off_cuts && k < K; ++k) {
            const TopSet top{cuts[2 * k], cuts[2 * k + 1]};
            const int64_t last = i0 + len - 1;
            off_cuts = top.J >= last || top.J < i0;
            const int64_t tb = top.J >= last ? top.T - 1 : top.T;
            t32[k] = (int32_t)std::max<int64_t>(std::min<int64_t>(tb, INT32_MAX), -1);
        }
        if (off_cuts) {
            const float* b = ew_row((const void*)base, dt, i0, len, bb);
            const float* xs[8];
            for (int k = 0; k < K; ++k) xs[k] = ew_row((const void*)models[k], dt, i0, len, D(k));
            const float kf = (float)kmin;
            const bool done = with_k<8>(K, [&](auto kc) {
                constexpr int KT = decltype(kc)::value;
                if constexpr (KT > 0) {
                    if (normalize) ta_fused<KT, false, false, true, 2>(b, xs, nullptr, lambdas, kf, lam, len, o, nullptr, acc, t32);
                    else ta_fused<KT, false, false, true, 1>(b, xs, nullptr, lambdas, kf, lam, len, o, nullptr, acc, t32);
                    return true;
                }
                return false;
            });
            if (done) {
                stream_block((void*)out, out_dt, i0, len, o);
                return;
            }
        }
        if (!ties && K <= 8) {  // the fused pass: masks rows in T(0..K-1) when packing
            const float* b = ew_row((const void*)base, dt, i0, len, bb);
            const float* xs[8];
            for (int k = 0; k < K; ++k) xs[k] = ew_row((const void*)models[k], dt, i0, len, D(k));
            const float* mt = mtl ? ew_row((const void*)mtl, mtl_dt, i0, len, v) : nullptr;
            float* keep = bits ? T(0) : nullptr;
            const float kf = (float)kmin;
            const bool done = with_k<8>(K, [&](auto kc) {
                constexpr int KT = decltype(kc)::value;
                if constexpr (KT > 0) {
                    if (out && !mtl && !bits) ta_fused<KT, false, false, true>(b, xs, mt, lambdas, kf, lam, len, o, keep, acc);
                    else if (!out && mtl) ta_fused<KT, true, true, false>(b, xs, mt, lambdas, kf, lam, len, o, keep, acc);
                    else if (!out && !mtl) ta_fused<KT, false, true, false>(b, xs, mt, lambdas, kf, lam, len, o, keep, acc);
                    else return false;
                    return true;
                }
                return false;
            });
            if (done) {
                if (bits)
                    for (int k = 0; k < K; ++k) pack_row(T(k), len, (uint8_t*)bits + k * row_bytes, i0);
                if (out) stream_block((void*)out, out_dt, i0, len, o);
                return;
            }
        }
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
