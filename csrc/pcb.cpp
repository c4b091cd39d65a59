// PCB-merging (fastmerge/methods/pcb.py). With d_k = model_k - base, total = sum_k d_k, the
// clamp bounds lo_k, hi_k of |d_k| (order statistics from select_ranges, on the host):
//   a = clamp(|d_k|, lo_k, hi_k), score_k = exp(K ((a - lo_k) / (hi_k - lo_k))^2) tanh(d_k total)
//   (the ratio 0 where hi_k == lo_k),
// pcb_select: one pass computing every score, its order key's top 16 bits (stored, 2 bytes an
// element and model) and their histogram per model, and the max; then a scan of the stored
// keys recomputes the scores in the bin that holds rank `rank` and selects it exactly
// (arcee_fusion.cpp's scheme). pcb_merge: one pass,
//   scale_k = (max(score_k, q_k) - q_k) / (M_k - q_k) (0 where M_k == q_k),
//   out = base + lam ((sum_k (w_k sign(d_k) a) scale_k) / max(sum_k scale_k, 1e-12)).
// exp and tanh are fmath.h's polynomials (about 1 ulp from torch's), so the scores, and the
// result, agree with the reference to fp32 round-off, not bit for bit.
#pragma GCC optimize("no-trapping-math")  // as ram.cpp: blends instead of branches, IEEE values
#include <algorithm>
#include <memory>

#include "elementwise.h"
#include "fmath.h"
#include "research.h"

namespace fm {

namespace {

struct Pcb {
    const void* base;
    const std::vector<uint64_t>& models;
    int dt;
    const std::vector<float>& lo;
    const std::vector<float>& hi;

    int K() const { return (int)models.size(); }

    // scratch: bb | total | D_0 .. D_{K-1}; loads the block, the deltas and their sum
    void load(int64_t i0, int len, float* s, int64_t* flags) const {
        const int K = this->K();
        float* __restrict bb = s;
        float* __restrict tot = s + EW_BLOCK;
        load_block(base, dt, i0, len, bb);
        flags[K] |= ew_nonfinite(bb, len);
        for (int j = 0; j < len; ++j) tot[j] = 0.0f;
        for (int k = 0; k < K; ++k) {
            float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
            load_block((const void*)models[k], dt, i0, len, d);
            flags[k] |= ew_nonfinite(d, len);
            for (int j = 0; j < len; ++j) {
                d[j] = d[j] - bb[j];
                tot[j] = tot[j] + d[j];
            }
        }
    }

    // score of delta d (model k) with the deltas' sum tot; a: its clamped magnitude. SMALL:
    // every |d tot| of the block is below 0.625, where tanh_f is tanh_small (same values, no
    // exp and division for the branch it would discard)
    template <bool SMALL = false>
    static inline float score(float d, float tot, float lo, float hi, float Kf, float* a) {
        const float c = std::min(std::max(std::fabs(d), lo), hi);
        *a = c;
        const float span = hi - lo;
        const float r = span > 0.0f ? (c - lo) / (span > 0.0f ? span : 1.0f) : 0.0f;
        return exp_f(Kf * (r * r)) * (SMALL ? tanh_small(d * tot) : tanh_f(d * tot));
    }

    // 1 if every |d[j] tot[j]| of the block is below 0.625 (the tanh_small range)
    static inline bool small_block(const float* __restrict d, const float* __restrict tot, int len) {
        float m = 0.0f;
        for (int j = 0; j < len; ++j) m = std::max(m, std::fabs(d[j] * tot[j]));
        return m < 0.625f;
    }
};

}  // namespace

std::tuple<std::vector<float>, std::vector<float>, std::vector<int>>
pcb_select(uint64_t base, const std::vector<uint64_t>& models, int dt, int64_t n, const std::vector<float>& lo,
           const std::vector<float>& hi, int64_t rank, int nthreads) {
    const int K = (int)models.size();
    const Pcb pc{(const void*)base, models, dt, lo, hi};
    const float Kf = (float)K;
    std::unique_ptr<uint16_t[]> key16(new uint16_t[(size_t)n * K]);  // model k's row at k * n
    advise_huge(key16.get(), n * K * 2);
    const int nt = ew_threads(nthreads, n);
    const int64_t nb = (n + EW_BLOCK - 1) / EW_BLOCK;
    std::vector<int64_t> hist((size_t)65536 * K, 0);
    std::vector<uint32_t> top(K, 0);
    std::vector<int64_t> fl(K + 1, 0);
#pragma omp parallel num_threads(nt)
    {
        std::vector<float> buf((size_t)(K + 3) * EW_BLOCK + 16);
        float* s = (float*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
        float* sc = s + (int64_t)(K + 2) * EW_BLOCK;
        std::vector<uint32_t> h((size_t)65536 * K, 0);  // 32-bit: a thread counts < 2^31 per model
        std::vector<uint32_t> mx(K, 0);
        std::vector<int64_t> f(K + 1, 0);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t i0 = b * EW_BLOCK;
            const int len = (int)std::min<int64_t>(EW_BLOCK, n - i0);
            pc.load(i0, len, s, f.data());
            const float* tot = s + EW_BLOCK;
            for (int k = 0; k < K; ++k) {
                const float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
                const float l = lo[k], u = hi[k];
                if (Pcb::small_block(d, tot, len)) {
                    for (int j = 0; j < len; ++j) {
                        float a;
                        sc[j] = Pcb::score<true>(d[j], tot[j], l, u, Kf, &a);
                    }
                } else {
                    for (int j = 0; j < len; ++j) {
                        float a;
                        sc[j] = Pcb::score(d[j], tot[j], l, u, Kf, &a);
                    }
                }
                uint16_t* __restrict k16 = key16.get() + (size_t)k * n + i0;
                uint32_t m = mx[k];
                for (int j = 0; j < len; ++j) {
                    const uint32_t key = order_key(sc[j]);
                    k16[j] = (uint16_t)(key >> 16);
                    m = std::max(m, key);
                }
                mx[k] = m;
                uint32_t* hk = h.data() + (size_t)65536 * k;
                for (int j = 0; j < len; ++j) hk[k16[j]]++;
            }
        }
#pragma omp critical
        {
            for (size_t i = 0; i < h.size(); ++i) hist[i] += h[i];
            for (int k = 0; k < K; ++k) top[k] = std::max(top[k], mx[k]);
            for (int k = 0; k <= K; ++k) fl[k] |= f[k];
        }
    }
    std::vector<int> flags(K + 1);
    for (int k = 0; k <= K; ++k) flags[k] = fl[k] != 0;
    std::vector<float> q(K, 0.0f), M(K, 0.0f);
    for (int k = 0; k <= K; ++k)
        if (flags[k]) return {q, M, flags};
    // per model: the bin holding rank `rank` and the rank inside it
    std::vector<int> bin(K);
    std::vector<int64_t> inner(K);
    for (int k = 0; k < K; ++k) {
        const int64_t* hk = hist.data() + (size_t)65536 * k;
        int64_t below = 0;
        int b = 0;
        for (; b < 65535 && below + hk[b] <= rank; ++b) below += hk[b];
        bin[k] = b;
        inner[k] = rank - below;
        M[k] = key_value(top[k]);
    }
    // the exact keys in those bins, recomputed from the inputs
    std::vector<std::vector<std::vector<uint32_t>>> found(nt, std::vector<std::vector<uint32_t>>(K));
#pragma omp parallel num_threads(nt)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t i0 = b * EW_BLOCK;
            const int len = (int)std::min<int64_t>(EW_BLOCK, n - i0);
            for (int k = 0; k < K; ++k) {
                const uint16_t* __restrict k16 = key16.get() + (size_t)k * n + i0;
                const uint16_t want = (uint16_t)bin[k];
                for_matching(k16, len, [&](uint16_t v) { return v == want; }, [&](int j) {
                    const int64_t i = i0 + j;
                    const float bv = load_one((const void*)base, dt, i);
                    float tot = 0.0f, dk = 0.0f;
                    for (int m = 0; m < K; ++m) {
                        const float d = load_one((const void*)models[m], dt, i) - bv;
                        tot = tot + d;
                        dk = m == k ? d : dk;
                    }
                    float a;
                    found[t][k].push_back(order_key(Pcb::score(dk, tot, lo[k], hi[k], Kf, &a)));
                });
            }
        }
    }
    for (int k = 0; k < K; ++k) q[k] = nth_found(found, k, inner[k]);
    return {q, M, flags};
}

std::vector<int> pcb_merge(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out, int out_dt,
                           int64_t n, const std::vector<float>& lo, const std::vector<float>& hi,
                           const std::vector<float>& q, const std::vector<float>& M, const std::vector<float>& w,
                           float lam, int nthreads) {
    const int K = (int)models.size();
    const Pcb pc{(const void*)base, models, dt, lo, hi};
    const float Kf = (float)K;
    advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    // scratch: bb | total | D_0 .. D_{K-1} | num | den
    auto sums = ew_parallel(n, nthreads, K + 2, (int64_t)(K + 4) * EW_BLOCK,
                            [&](int64_t i0, int len, float* s, int64_t* acc) {
        pc.load(i0, len, s, acc);
        const float* __restrict bb = s;
        const float* __restrict tot = s + EW_BLOCK;
        float* __restrict num = s + (int64_t)(K + 2) * EW_BLOCK;
        float* __restrict den = num + EW_BLOCK;
        for (int j = 0; j < len; ++j) { num[j] = 0.0f; den[j] = 0.0f; }
        for (int k = 0; k < K; ++k) {
            const float* __restrict d = s + (int64_t)(k + 2) * EW_BLOCK;
            const float l = lo[k], u = hi[k], qk = q[k], span = M[k] - q[k], wk = w[k];
            const bool live = span > 0.0f;
            auto body = [&](auto small) {
                for (int j = 0; j < len; ++j) {
                    float a;
                    const float sco = Pcb::score<decltype(small)::value>(d[j], tot[j], l, u, Kf, &a);
                    const float scale = live ? (std::max(sco, qk) - qk) / (live ? span : 1.0f) : 0.0f;
                    const float sg = d[j] > 0.0f ? 1.0f : (d[j] < 0.0f ? -1.0f : 0.0f);
                    num[j] = num[j] + (wk * (sg * a)) * scale;
                    den[j] = den[j] + scale;
                }
            };
            if (Pcb::small_block(d, tot, len)) body(std::true_type{});
            else body(std::false_type{});
        }
        for (int j = 0; j < len; ++j) num[j] = bb[j] + lam * (num[j] / std::max(den[j], 1e-12f));
        acc[K + 1] |= ew_nonfinite(num, len);
        stream_block((void*)out, out_dt, i0, len, num);
    });
    return ew_flags(sums, 0, K + 2);
}

}  // namespace fm
