// Per-model keep decisions of every mask kind (MASK_*), shared by the passes that apply a
// mask: mask_norms.cpp and the fused merge (fused_merge.cpp, and through MergeBlock the fused
// quantizers). Inline, so each pass's block loop compiles it in place.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "kernels.h"

namespace fm {

// Per model, the selection "top set of size k": key > T or (key == T and index <= J).
struct TopSet { int64_t T; int64_t J; };

// 1 if (key, index i) is in the top set: key > T, or key == T and i <= J. Branch-free.
static inline uint32_t in_top_bits(uint32_t key, int64_t i, const TopSet& s) {
    const int64_t k = (int64_t)key;
    return (uint32_t)(k > s.T) | ((uint32_t)(k == s.T) & (uint32_t)(i <= s.J));
}

// keep[j] = all ones (kept) or 0 (dropped) for model m on elements i0..i0+len-1; d holds the
// delta (for keys). Bit masks rather than bools so every consumer stays branch-free.
static inline void eval_mask(const MaskArgs& a, const PhiloxKey& key, int m, int64_t i0, int len,
                             const float* __restrict d, uint32_t* __restrict keep, float* __restrict tmp) {
    switch (a.kind[m]) {
        case MASK_NONE:
            for (int j = 0; j < len; ++j) keep[j] = ~0u;
            break;
        case MASK_ZERO:
            for (int j = 0; j < len; ++j) keep[j] = 0u;
            break;
        case MASK_RANGE: {
            const TopSet stop{a.ranges[4 * m], a.ranges[4 * m + 1]};
            const TopSet start{a.ranges[4 * m + 2], a.ranges[4 * m + 3]};
            if (start.T >= NONE_T) {  // plain top-k (TIES)
                const int64_t last = i0 + len - 1;
                if (stop.J >= last || stop.J < i0) {
                    // The tie cut J is outside this block (every block but one): the ties at T
                    // are all kept (key >= T) or all dropped (key > T), so one 32-bit compare
                    // per element decides, which vectorises; keys are < 2^31.
                    const int64_t tb = stop.J >= last ? stop.T - 1 : stop.T;
                    const int32_t t32 = (int32_t)std::min<int64_t>(tb, INT32_MAX);
                    for (int j = 0; j < len; ++j)
                        keep[j] = 0u - (uint32_t)((int32_t)mag_key(d[j]) > t32);
                } else {
                    for (int j = 0; j < len; ++j)
                        keep[j] = 0u - in_top_bits(mag_key(d[j]), i0 + j, stop);
                }
                break;
            }
            for (int j = 0; j < len; ++j) {
                const uint32_t k = mag_key(d[j]);
                const int64_t i = i0 + j;
                keep[j] = 0u - (in_top_bits(k, i, stop) & (in_top_bits(k, i, start) ^ 1u));
            }
            break;
        }
        case MASK_RANDOM: {
            // Philox draws 4 uniforms per counter: start at the counter holding i0 (blocks of the
            // merge start at multiples of 4; rows of the fused quantizers may start anywhere)
            const int off = (int)(i0 & 3);
            philox_uniform_block(key, i0 - off, len + off, (uint32_t)m, tmp);
            const float p = a.p[m];
            const float* u = tmp + off;
            for (int j = 0; j < len; ++j) keep[j] = 0u - (uint32_t)(u[j] < p);
            break;
        }
        case MASK_BITS: {
            const uint64_t* w = (const uint64_t*)a.bits[m] + (i0 >> 6);
            if (i0 & 63) {  // a row that starts inside a word (fused quantizers only)
                const int s = (int)(i0 & 63);
                for (int j = 0; j < len; ++j)
                    keep[j] = 0u - (uint32_t)((w[(s + j) >> 6] >> ((s + j) & 63)) & 1u);
                break;
            }
            for (int wj = 0; wj * 64 < len; ++wj) {
                const uint64_t word = w[wj];
                const int jmax = std::min(64, len - wj * 64);
                uint32_t* kk = keep + wj * 64;
                for (int t = 0; t < jmax; ++t) kk[t] = 0u - (uint32_t)((word >> t) & 1u);
            }
            break;
        }
    }
}

}  // namespace fm
