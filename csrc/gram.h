// Kernels of mergekit's other methods (fastmerge/methods/): slerp, nuslerp, multislerp, karcher
// and model_stock are each ONE reduction pass (gram.cpp: the inputs' pairwise dot products),
// host math on that tiny K x K matrix (fastmerge/methods/<name>.py's fused()), and ONE
// elementwise pass (lincomb.cpp: a linear combination of the inputs).
//
// Layout of the vectors (shared by both kernels): a contiguous tensor of outer * length * inner
// elements holds outer * inner vectors of `length` elements each; vector v = o * inner + i has
// its elements at (o * length + l) * inner + i for l = 0 .. length-1.
//   whole tensor:          outer = 1,       length = numel,  inner = 1
//   each last-dim row:     outer = #rows,   length = cols,   inner = 1
//   each dim-0 column:     outer = 1,       length = dim 0,  inner = numel / dim 0
// Indices are 64-bit throughout; only in-block offsets (< GRAM_BLK) are int.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace fm {

constexpr int GRAM_BLK = 512;  // elements per block: buffers of this many floats per input

// K inputs xs (and, when base != 0, the base subtracted first: d_k = x_k - base, in fp32 as the
// references do) -> out (float64, outer * inner matrices of K x K, row-major, symmetric):
// out[v][a][b] = sum_l d_a[l] d_b[l]. Sums are double, over fixed chunks added in chunk order,
// so the result does not depend on the thread count. Returns K + 1 flags: input k (then the
// base) held inf or nan.
std::vector<int> gram(uint64_t base, const std::vector<uint64_t>& xs, int dt, int64_t outer,
                      int64_t length, int64_t inner, uint64_t out, int nthreads);

// out = sum_k c_k[v] x_k + c_base[v] base (delta: sum_k c_k[v] (x_k - base) + c_base[v] base),
// in fp32, rounded once to out_dt. coef: float32, (K + 1) rows of outer * inner (one value per
// vector; row K is the base's, read only when base != 0). Returns the K + 1 non-finite flags,
// then one more: some fp32 result (before the rounding to out_dt) is inf or nan.
std::vector<int> lincomb(uint64_t base, const std::vector<uint64_t>& xs, int dt, uint64_t out,
                         int out_dt, int64_t outer, int64_t length, int64_t inner, uint64_t coef,
                         bool delta, int nthreads);

// 1 when any of v[0..n) is inf or nan: v * 0 is nan exactly then (branch-free; vectorizes as
// an unordered compare, where a bit test through memcpy stays scalar).
static inline uint32_t any_nonfinite(const float* __restrict v, int n) {
    uint32_t acc = 0;
    for (int j = 0; j < n; ++j) {
        const float z = v[j] * 0.0f;
        acc |= (uint32_t)(z != z);
    }
    return acc;
}

// One thread's view of the inputs: loads a run of elements of every input into fp32 buffers
// (the base subtracted when delta), OR-ing their non-finite flags into bad[].
struct InputBlock {
    InputBlock(uint64_t base, const std::vector<uint64_t>& xs, int dt, bool delta)
        : base_((const void*)base), dt_(dt), delta_(delta && base != 0), K((int)xs.size()),
          buf((size_t)(K + 1) * GRAM_BLK), bad((size_t)K + 1, 0u) {
        for (uint64_t p : xs) xs_.push_back((const void*)p);
    }
    // input k's values of elements i0 .. i0+n-1 land in x(k); the base's in b()
    void load(int64_t i0, int n) {
        float* bb = b();
        if (base_) {
            load_block(base_, dt_, i0, n, bb);
            bad[K] |= any_nonfinite(bb, n);
        }
        for (int k = 0; k < K; ++k) {
            float* d = x(k);
            load_block(xs_[k], dt_, i0, n, d);
            bad[k] |= any_nonfinite(d, n);
            if (delta_)
                for (int j = 0; j < n; ++j) d[j] = d[j] - bb[j];
        }
    }
    float* x(int k) { return buf.data() + (size_t)k * GRAM_BLK; }
    float* b() { return buf.data() + (size_t)K * GRAM_BLK; }

    const void* base_;
    std::vector<const void*> xs_;
    int dt_;
    bool delta_;
    int K;
    std::vector<float> buf;
    std::vector<uint32_t> bad;
};

// The flags of every thread's InputBlock, OR-ed (order-independent) into flags[0 .. K].
static inline void merge_flags(std::vector<int>& flags, const InputBlock& in) {
    for (size_t k = 0; k < in.bad.size(); ++k) flags[k] |= (int)in.bad[k];
}

// One block of n elements of every input, as fp32 rows x[k] (fp32 inputs read in place, others
// converted into the thread's buffer) and the base's row b (null without a base).
struct RowBlock {
    RowBlock(uint64_t base, const std::vector<uint64_t>& xs, int dt)
        : base_((const void*)base), dt_(dt), K((int)xs.size()), buf((size_t)(K + 1) * GRAM_BLK),
          x((size_t)K), bad((size_t)K + 1, 0u) {
        for (uint64_t p : xs) xs_.push_back((const void*)p);
    }
    const float* row(const void* p, int slot, int64_t i0, int n) {
        if (dt_ == DTYPE_F32) return (const float*)p + i0;
        float* d = buf.data() + (size_t)slot * GRAM_BLK;
        load_block(p, dt_, i0, n, d);
        return d;
    }
    void load(int64_t i0, int n) {
        b = nullptr;
        if (base_) {
            b = row(base_, K, i0, n);
            bad[K] |= any_nonfinite(b, n);
        }
        for (int k = 0; k < K; ++k) {
            x[k] = row(xs_[k], k, i0, n);
            bad[k] |= any_nonfinite(x[k], n);
        }
    }

    const void* base_;
    std::vector<const void*> xs_;
    int dt_;
    int K;
    std::vector<float> buf;
    std::vector<const float*> x;
    const float* b = nullptr;
    std::vector<uint32_t> bad;
};

// The flags of every thread's RowBlock, OR-ed (order-independent).
static inline void merge_row_flags(std::vector<int>& flags, const RowBlock& in) {
    for (size_t k = 0; k < in.bad.size(); ++k) flags[k] |= (int)in.bad[k];
}

}  // namespace fm
