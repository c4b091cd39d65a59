// Float helpers shared by the kernels that select over computed values or evaluate
// transcendental functions per element (arcee_fusion.cpp, pcb.cpp): order keys, exp and tanh
// as straight-line polynomials (Cephes' single-precision approximations, about 1 ulp), so the
// element loops vectorise; every operation is an IEEE +, *, / (no FMA contraction: the build
// passes -ffp-contract=off), so a vector lane and a scalar call give the same bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace fm {

// order key of a float (-0 as +0): unsigned order = float order
inline uint32_t order_key(float v) {
    uint32_t u = f2u(v);
    u = u == 0x80000000u ? 0u : u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float key_value(uint32_t k) { return u2f((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

// The exact-selection rescan of arcee_fusion.cpp and pcb.cpp: f(j) for every j < len whose
// stored 16-bit key k16[j] matches (the bins holding the wanted order statistics), 64 keys at a
// time, so that the many stretches without a match cost one compare a key.
template <class Match, class F>
inline void for_matching(const uint16_t* __restrict k16, int len, Match match, F f) {
    for (int j0 = 0; j0 < len; j0 += 64) {
        const int e = std::min(len, j0 + 64);
        int any = 0;
        for (int j = j0; j < e; ++j) any |= (int)match(k16[j]);
        if (!any) continue;
        for (int j = j0; j < e; ++j)
            if (match(k16[j])) f(j);
    }
}

// The value of the order statistic `inner` (0-based, ascending) among the keys the threads
// found for query q (found[thread][q]), as a float.
inline float nth_found(const std::vector<std::vector<std::vector<uint32_t>>>& found, int q, int64_t inner) {
    std::vector<uint32_t> all;
    for (const auto& per_thread : found) all.insert(all.end(), per_thread[q].begin(), per_thread[q].end());
    std::nth_element(all.begin(), all.begin() + inner, all.end());
    return key_value(all[inner]);
}

// exp(x), x clamped to [-87, 88] (below: < 1e-37, above: near FLT_MAX): the range the callers
// need (arcee's x <= 0 is x - row max; PCB's x lies in [0, 2 K] or is 2 |x| of tanh).
inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float nf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
    float r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = (y * r) * r + r + 1.0f;
    // 2^n in two factors: n up to 128 (x near 88) overflows a single exponent field
    const int32_t n = (int32_t)nf;
    const int32_t h = n >> 1;
    return (y * u2f((uint32_t)(h + 127) << 23)) * u2f((uint32_t)(n - h + 127) << 23);
}

// tanh(x) for |x| < 0.625: the odd polynomial
inline float tanh_small(float x) {
    const float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z + -5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z + -3.33332819422e-1f;
    return (p * z) * x + x;
}

// tanh(x): tanh_small below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above (with the sign), 1
// beyond |x| = 9 (tanh rounds to 1 there).
inline float tanh_f(float x) {
    const float ax = std::fabs(x);
    const float small = tanh_small(x);
    const float e = exp_f(2.0f * (ax > 9.0f ? 9.0f : ax));
    const float big = 1.0f - 2.0f / (e + 1.0f);
    const float r = ax < 0.625f ? small : (ax > 9.0f ? 1.0f : big) * (x < 0.0f ? -1.0f : 1.0f);
    return r;
}

}  // namespace fm
