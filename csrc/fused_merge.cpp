// The fused merge pass: reads base + K inputs once, writes the output once. Masks are
// evaluated on the fly (masks.h) from thresholds, Philox counters or bits. The per-block work
// is MergeBlock's (kernels.h), which quant.cpp's fused quantizers share; mask-free plans (task
// arithmetic, linear) take a register-resident path (run_plain).
// Triton's counterpart: triton_kernels/fused_merge.py.
#include "common.h"
#include "kernels.h"
#include "masks.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fm {

MergeBlock::MergeBlock(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt, const MaskArgs& ma,
                       const MergeArgs& a, uint64_t sign_ptr)
    : bad(models.size() + 2, 0), base_((const void*)base_ptr), models_(models), dt_(dt), K_((int)models.size()),
      ma_(ma), a_(a), sign_((int8_t*)sign_ptr), key_(philox_key(ma.seed)),
      need_s_(a.consensus != CONSENSUS_NONE && !a.elect_weighted),
      plain_(a.consensus == CONSENSUS_NONE && a.scale_mode == SCALE_NONE &&
             std::all_of(ma.kind.begin(), ma.kind.end(), [](int k) { return k == MASK_NONE; })),
      V_((size_t)K_ * BLK), S_(need_s_ ? (size_t)K_ * BLK : 0) {}

bool MergeBlock::run(int64_t i0, int len, float* __restrict mixed) {
    const int K = K_;
    const MaskArgs& ma = ma_;
    const MergeArgs& a = a_;
    float* __restrict bb = bb_;
    float* __restrict d = d_;
    float* __restrict total = total_;
    float* __restrict div = div_;
    if (plain_) {
        run_plain(i0, len, mixed);
        return true;
    }
    if (base_) {
        load_block(base_, dt_, i0, len, bb);
        int f = 0;
        for (int j = 0; j < len; ++j) f |= nonfinite_bits(bb[j]);
        bad[K] |= f;
    }
    for (int m = 0; m < K; ++m) {
        load_block((const void*)models_[m], dt_, i0, len, d);
        int f = 0;
        for (int j = 0; j < len; ++j) f |= nonfinite_bits(d[j]);
        bad[m] |= f;
        if (base_)
            for (int j = 0; j < len; ++j) d[j] = d[j] - bb[j];
        float* v = V_.data() + (size_t)m * BLK;
        if (ma.kind[m] != MASK_NONE) {
            eval_mask(ma, key_, m, i0, len, d, keep_, tmp_);
            for (int j = 0; j < len; ++j) d[j] = u2f(f2u(d[j]) & keep_[j]);  // dropped -> +0
        }
        if (a.scale_mode == SCALE_MUL) {
            const float s = a.scale[m];
            for (int j = 0; j < len; ++j) d[j] = d[j] * s;
        } else if (a.scale_mode == SCALE_DIV) {
            const float s = a.scale[m];
            for (int j = 0; j < len; ++j) d[j] = d[j] / s;
        }
        if (need_s_) std::memcpy(S_.data() + (size_t)m * BLK, d, sizeof(float) * len);
        const float w = a.weights[m];
        for (int j = 0; j < len; ++j) v[j] = d[j] * w;
    }
    for (int j = 0; j < len; ++j) mixed[j] = 0.0f;
    bool have_div = false;
    if (a.consensus == CONSENSUS_NONE) {
        for (int m = 0; m < K; ++m) {
            const float* v = V_.data() + (size_t)m * BLK;
            for (int j = 0; j < len; ++j) mixed[j] = mixed[j] + v[j];
        }
    } else {
        const float* E = a.elect_weighted ? V_.data() : S_.data();
        if (a.consensus == CONSENSUS_GIVEN) {
            for (int j = 0; j < len; ++j) total[j] = sign_[i0 + j] > 0 ? 1.0f : -1.0f;
        } else {
            for (int j = 0; j < len; ++j) total[j] = 0.0f;
            for (int m = 0; m < K; ++m) {
                const float* e = E + (size_t)m * BLK;
                if (a.consensus == CONSENSUS_SUM)
                    for (int j = 0; j < len; ++j) total[j] = total[j] + e[j];
                else
                    for (int j = 0; j < len; ++j) total[j] = total[j] + (float)((e[j] > 0.0f) - (e[j] < 0.0f));
            }
        }
        if (a.sign_only) {
            for (int j = 0; j < len; ++j) sign_[i0 + j] = total[j] >= 0.0f ? 1 : -1;
            return false;
        }
        for (int j = 0; j < len; ++j) div[j] = 0.0f;
        for (int m = 0; m < K; ++m) {
            const float* e = E + (size_t)m * BLK;
            const float* v = V_.data() + (size_t)m * BLK;
            const float w = a.divisor == DIVISOR_COUNT ? 1.0f : a.weights[m];
            const uint32_t wb = f2u(w);
            for (int j = 0; j < len; ++j) {
                // branch-free so it vectorises: agree iff sign(e) == elected sign;
                // a disagreeing input adds +0 exactly like the reference's where(.., 0)
                const uint32_t pos = (uint32_t)(total[j] >= 0.0f);
                const uint32_t agree = (pos & (uint32_t)(e[j] > 0.0f)) | ((pos ^ 1u) & (uint32_t)(e[j] < 0.0f));
                const uint32_t mk = 0u - agree;
                mixed[j] = mixed[j] + u2f(f2u(v[j]) & mk);
                div[j] = div[j] + u2f(wb & mk);
            }
        }
        if (a.divisor == DIVISOR_COUNT)
            for (int j = 0; j < len; ++j) div[j] = div[j] < 1.0f ? 1.0f : div[j];
        else
            for (int j = 0; j < len; ++j) div[j] = div[j] == 0.0f ? 1.0f : div[j];
        have_div = true;
    }
    finish(len, mixed, have_div);
    round_to(round_dt_, mixed, len);
    return true;
}

#ifdef __AVX2__
template <class F>
static inline void with_bool(bool b, F&& f) {
    if (b) f(std::true_type{});
    else f(std::false_type{});
}

// The tail of one merged vector of a plain merge: normalize by the constant divisor, lambda,
// + base, non-finite check, rounding to the output dtype. The options are template parameters,
// so the hot loops below carry no per-vector branches (measured: the branchy tail cost more
// than the merge arithmetic).
template <bool DIV, bool LAM, bool BASE, bool CHECK, int RDT>
struct PlainTail {
    static constexpr bool base = BASE;
    __m256 cd, lam;
    __m256 operator()(__m256 acc, __m256 b, __m256i& nf) const {
        if (DIV) acc = _mm256_div_ps(acc, cd);
        if (LAM) acc = _mm256_mul_ps(acc, lam);
        if (BASE) acc = _mm256_add_ps(b, acc);
        if (CHECK) {
            const __m256i em = _mm256_set1_epi32(0x7f800000);
            nf = _mm256_or_si256(nf, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(acc), em), em));
        }
        return round8(RDT, acc);
    }
};

// run_plain's vector loops for one Tail; returns the index of the first element left to the
// scalar loop. bf16: 16 bf16 -> two fp32 vectors by interleaving with zeros, which yields
// elements 0-3, 8-11 and 4-7, 12-15 (per 128-bit lane); every input shares the order and the
// store restores it (cheaper than widening 8 at a time). (x - base) * w skips the multiply
// when every weight is 1: the same value, exactly. Two vectors per step: independent add
// chains hide the add latency across the K inputs.
template <bool UNIT, class Tail>
static int plain_vectors(const Tail& tail, const void* base, const uint64_t* models, const float* weights, int K,
                         int dt, int64_t i0, int len, float* __restrict mixed, __m256i& nf) {
    constexpr bool B = Tail::base;
    int j = 0;
    if (dt == DTYPE_BF16) {
        const __m256i z = _mm256_setzero_si256();
        auto lo = [&](__m256i h) { return _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, h)); };
        auto hi = [&](__m256i h) { return _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, h)); };
        for (; j + 16 <= len; j += 16) {
            __m256 b0 = _mm256_setzero_ps(), b1 = b0;
            if (B) {
                const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i0 + j));
                b0 = lo(h);
                b1 = hi(h);
            }
            __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
            for (int m = 0; m < K; ++m) {
                const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)models[m] + i0 + j));
                __m256 t0 = B ? _mm256_sub_ps(lo(h), b0) : lo(h), t1 = B ? _mm256_sub_ps(hi(h), b1) : hi(h);
                if (!UNIT) {
                    const __m256 w = _mm256_set1_ps(weights[m]);
                    t0 = _mm256_mul_ps(t0, w);
                    t1 = _mm256_mul_ps(t1, w);
                }
                acc0 = _mm256_add_ps(acc0, t0);
                acc1 = _mm256_add_ps(acc1, t1);
            }
            acc0 = tail(acc0, b0, nf);
            acc1 = tail(acc1, b1, nf);
            _mm256_storeu_ps(mixed + j, _mm256_permute2f128_ps(acc0, acc1, 0x20));
            _mm256_storeu_ps(mixed + j + 8, _mm256_permute2f128_ps(acc0, acc1, 0x31));
        }
    }
    for (; j + 16 <= len; j += 16) {
        const __m256 b0 = B ? load8(base, dt, i0 + j) : _mm256_setzero_ps();
        const __m256 b1 = B ? load8(base, dt, i0 + j + 8) : _mm256_setzero_ps();
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
        for (int m = 0; m < K; ++m) {
            const __m256 w = _mm256_set1_ps(weights[m]);
            const __m256 x0 = load8((const void*)models[m], dt, i0 + j);
            const __m256 x1 = load8((const void*)models[m], dt, i0 + j + 8);
            acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(B ? _mm256_sub_ps(x0, b0) : x0, w));
            acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(B ? _mm256_sub_ps(x1, b1) : x1, w));
        }
        _mm256_storeu_ps(mixed + j, tail(acc0, b0, nf));
        _mm256_storeu_ps(mixed + j + 8, tail(acc1, b1, nf));
    }
    for (; j + 8 <= len; j += 8) {
        const __m256 b = B ? load8(base, dt, i0 + j) : _mm256_setzero_ps();
        __m256 acc = _mm256_setzero_ps();
        for (int m = 0; m < K; ++m) {
            const __m256 x = load8((const void*)models[m], dt, i0 + j);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(B ? _mm256_sub_ps(x, b) : x, _mm256_set1_ps(weights[m])));
        }
        _mm256_storeu_ps(mixed + j, tail(acc, b, nf));
    }
    return j;
}
#endif

// Task arithmetic / linear (no masks, rescale or consensus): mixed = sum_m (x_m - base) * w_m,
// normalized, times lambda, plus base: the general path's float operations in its order, but
// each input is loaded and accumulated in registers (the buffer round trips of the general path
// cost more than the arithmetic). Without masks a non-finite input always makes the fp32
// result non-finite (inf - inf, inf * 0 and nan all propagate), so the result is checked once
// instead of every input: bad[K + 1] says "some input" and the caller names it (a rescan, on
// the error path only).
void MergeBlock::run_plain(int64_t i0, int len, float* __restrict mixed) {
    const MergeArgs& a = a_;
    const int K = K_;
    const bool div_const = a.normalize && a.divisor == DIVISOR_CONST, scale = a.lam != 1.0f;
    int j = 0;
    uint32_t f = 0;
#ifdef __AVX2__
    __m256i nf = _mm256_setzero_si256();
    const bool unit = std::all_of(a.weights.begin(), a.weights.end(), [](float w) { return w == 1.0f; });
    const uint64_t* models = models_.data();
    const float* weights = a.weights.data();
    with_bool(div_const, [&](auto DIV) {
    with_bool(scale, [&](auto LAM) {
    with_bool(base_ != nullptr, [&](auto BASE) {
    with_bool(check_result_, [&](auto CHECK) {
    with_bool(unit, [&](auto UNIT) {
        auto go = [&](auto tail) {
            j = plain_vectors<decltype(UNIT)::value>(tail, base_, models, weights, K, dt_, i0, len, mixed, nf);
        };
        const __m256 cd = _mm256_set1_ps(a.const_div), lam = _mm256_set1_ps(a.lam);
        constexpr bool D = decltype(DIV)::value, L = decltype(LAM)::value, B = decltype(BASE)::value,
                       C = decltype(CHECK)::value;
        if (round_dt_ == DTYPE_BF16) go(PlainTail<D, L, B, C, DTYPE_BF16>{cd, lam});
        else if (round_dt_ == DTYPE_F16) go(PlainTail<D, L, B, C, DTYPE_F16>{cd, lam});
        else go(PlainTail<D, L, B, C, DTYPE_F32>{cd, lam});
    }); }); }); }); });
    f = (uint32_t)!_mm256_testz_si256(nf, nf);
#endif
    for (; j < len; ++j) {
        const float b = base_ ? load_one(base_, dt_, i0 + j) : 0.0f;
        float acc = 0.0f;
        for (int m = 0; m < K; ++m) {
            const float x = load_one((const void*)models_[m], dt_, i0 + j);
            acc = acc + (base_ ? x - b : x) * a.weights[m];
        }
        if (div_const) acc = acc / a.const_div;
        if (scale) acc = acc * a.lam;
        if (base_) acc = b + acc;
        if (check_result_) f |= nonfinite_bits(acc);
        round_to(round_dt_, &acc, 1);
        mixed[j] = acc;
    }
    bad[K + 1] |= (int)f;
}

// Prefetch elements i0 .. i0+len-1 of every input (see MergeBlock in kernels.h).
void MergeBlock::prefetch(int64_t i0, int len) const {
    const int esz = dt_ == DTYPE_F32 ? 4 : 2;
    const int64_t a = i0 * esz, e = (i0 + len) * esz;
    for (int m = -1; m < K_; ++m) {
        const char* p = (const char*)(m < 0 ? base_ : (const void*)models_[m]);
        if (!p) continue;
        // prefetcht1 (into L2): measured faster than prefetcht0 here, the fills no longer
        // compete with the demand loads for L1's miss buffers
        for (int64_t off = a; off < e; off += 64) __builtin_prefetch(p + off, 0, 2);
    }
}

// normalize, lambda, + base
void MergeBlock::finish(int len, float* __restrict mixed, bool have_div) {
    const MergeArgs& a = a_;
    const float* __restrict div = div_;
    const float* __restrict bb = bb_;
    if (a.normalize) {
        if (have_div) for (int j = 0; j < len; ++j) mixed[j] = mixed[j] / div[j];
        else if (a.divisor == DIVISOR_CONST) for (int j = 0; j < len; ++j) mixed[j] = mixed[j] / a.const_div;
    }
    if (a.lam != 1.0f)
        for (int j = 0; j < len; ++j) mixed[j] = mixed[j] * a.lam;
    if (base_)
        for (int j = 0; j < len; ++j) mixed[j] = bb[j] + mixed[j];
}

// Returns K+2 flags: non-finite values seen in input m, in base, and (mask-free plans, which check
// the result instead of each input) in some input.
std::vector<int> fused_merge(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt,
                             uint64_t out_ptr, int out_dt, int64_t n, const MaskArgs& ma,
                             const MergeArgs& a, uint64_t sign_ptr, int nthreads) {
    const int K = (int)models.size();
    const int nt = threads_for(nthreads, n);
    const int64_t nblocks = (n + BLK - 1) / BLK;
    std::vector<int> flags(K + 2, 0);
    advise_huge((void*)out_ptr, n * (out_dt == DTYPE_F32 ? 4 : 2));
#pragma omp parallel num_threads(nt)
    {
        MergeBlock mb(base_ptr, models, dt, ma, a, sign_ptr);
        alignas(64) float mixed[BLK];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t i0 = b * BLK;
            const int len = (int)std::min<int64_t>(BLK, n - i0);
            if (mb.run(i0, len, mixed)) store_block((void*)out_ptr, out_dt, i0, len, mixed);
        }
#pragma omp critical
        for (int m = 0; m < K + 2; ++m) flags[m] |= mb.bad[m];
    }
    return flags;
}

}  // namespace fm
