// Elementwise merges of mergekit's other methods (fastmerge/methods/<name>.py defines each):
// nearswap.cpp, ram.cpp (ram and ramplus_tl), passthrough.cpp.
//
// Every kernel reads its inputs in place (fp32/fp16/bf16, `dt`), computes in fp32 in the
// reference's operation order (so results are bit-identical to the torch reference), writes
// the output once, rounded to `out_dt`, and returns one non-finite flag per input: the models
// in order, then the base. Blocks of EW_BLOCK elements are handed out dynamically (eight at a time:
// a preempted thread on a shared machine does not hold up the others); per-element work never
// depends on the split, so the bytes do not depend on the thread count or the schedule.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace fm {

constexpr int EW_BLOCK = 1024;  // elements per block (thread-private fp32 buffers of this size)

// Threads for n elements: at most the requested count, at least one block each.
static inline int ew_threads(int requested, int64_t n) {
    const int64_t blocks = (n + EW_BLOCK - 1) / EW_BLOCK;
    return (int)std::max<int64_t>(1, std::min<int64_t>(requested > 0 ? requested : 1, blocks));
}

// 1 if some v[0..n) is inf or nan. Branch-free so it vectorises: an all-ones exponent plus one
// exponent unit carries into bit 31, every other exponent does not.
static inline int ew_nonfinite(const float* __restrict v, int n) {
    uint32_t acc = 0;
    for (int j = 0; j < n; ++j) acc |= (f2u(v[j]) & 0x7f800000u) + 0x00800000u;
    return (int)(acc >> 31);
}

// madvise(MADV_HUGEPAGE) on a fresh output (defined with the task-arithmetic kernels)
void advise_huge(void* p, int64_t bytes);

// The parallel loop of every kernel here: body(i0, len, scratch, acc) for each block of n
// elements, split dynamically over the threads. scratch: a thread's `scratch_floats` floats
// (64-byte aligned); acc: a thread's `nacc` zeroed integers, summed over the threads into the
// result (flags are 0/1 and so sum to "seen anywhere"; integer counts are exact in any order).
template <class Body>
std::vector<int64_t> ew_parallel(int64_t n, int nthreads, int nacc, int64_t scratch_floats, Body&& body) {
    std::vector<int64_t> total(nacc, 0);
    const int64_t nblocks = (n + EW_BLOCK - 1) / EW_BLOCK;
#pragma omp parallel num_threads(ew_threads(nthreads, n))
    {
        std::vector<int64_t> acc(nacc, 0);
        std::vector<float> buf((size_t)scratch_floats + 16);
        float* scratch = (float*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
#pragma omp for schedule(dynamic, 8)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t i0 = b * EW_BLOCK;
            body(i0, (int)std::min<int64_t>(EW_BLOCK, n - i0), scratch, acc.data());
        }
        stream_fence();  // the kernels stream their output (stream_block)
#pragma omp critical
        for (int m = 0; m < nacc; ++m) total[m] += acc[m];
    }
    return total;
}

// Elements i0 .. i0+n-1 of an input as fp32: in place for fp32, else converted into buf.
static inline const float* ew_row(const void* p, int dt, int64_t i0, int n, float* buf) {
    if (dt == DTYPE_F32) return (const float*)p + i0;
    load_block(p, dt, i0, n, buf);
    return buf;
}

// Entries off .. off+k-1 of ew_parallel's sums as 0/1 flags.
static inline std::vector<int> ew_flags(const std::vector<int64_t>& v, size_t off, size_t k) {
    std::vector<int> f(k);
    for (size_t m = 0; m < k; ++m) f[m] = v[off + m] != 0;
    return f;
}

// 1 in bit 31 where v is inf or nan (ew_nonfinite's test for one value, to OR across a loop)
static inline uint32_t bad_bits(float v) { return (f2u(v) & 0x7f800000u) + 0x00800000u; }

// Element j of the fused per-block loops (K a template constant): the deltas d[k] = x[k][j] - bj,
// their sum in Python's order (0 + d_0 + d_1 + ...), returned, and the inputs' inf/nan bits
// OR-ed into bx[k].
template <int K>
static inline float deltas_at(const float* const* x, int j, float bj, float* d, uint32_t* bx) {
    float v = 0.0f;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
        const float xv = x[k][j];
        bx[k] |= bad_bits(xv);
        d[k] = xv - bj;
        v = v + d[k];
    }
    return v;
}

#ifdef __AVX2__
// 8 bits of a compare mask in numpy.packbits order (the first element in bit 7): a movemask
// (element 0 in bit 0) bit-reversed through a table
static inline uint8_t packed8(__m256 m) {
    static const struct Rev {
        uint8_t t[256];
        Rev() {
            for (int v = 0; v < 256; ++v) {
                int r = 0;
                for (int i = 0; i < 8; ++i) r |= ((v >> i) & 1) << (7 - i);
                t[v] = (uint8_t)r;
            }
        }
    } rev;
    return rev.t[_mm256_movemask_ps(m) & 0xff];
}
#endif

// Packs keep[0..len) (0/1 floats; len a multiple of 8 but at the tensor's end) into the bytes of
// a numpy.packbits row from element i0 (a multiple of 8): the first element in bit 7, the
// missing elements of a last byte 0.
static inline void pack_row(const float* __restrict keep, int len, uint8_t* __restrict row, int64_t i0) {
    uint8_t* dst = row + (i0 >> 3);
    int b = 0;
#ifdef __AVX2__
    const __m256 zero = _mm256_setzero_ps();
    for (; b * 8 + 8 <= len; ++b) dst[b] = packed8(_mm256_cmp_ps(_mm256_loadu_ps(keep + b * 8), zero, _CMP_NEQ_UQ));
#endif
    for (; b * 8 < len; ++b) {
        uint32_t byte = 0;
        const int m = std::min(8, len - b * 8);
        for (int t = 0; t < m; ++t) byte |= (uint32_t)(keep[b * 8 + t] != 0.0f) << (7 - t);
        dst[b] = (uint8_t)byte;
    }
}

// sum_{j < n} f(j) (f: a non-negative fp32 term) in double: 8 lanes, each adding 8 terms in
// fp32 (relative error at most 7 fp32 ulps a partial sum) before the partials go into double
// lanes, combined in a fixed order. Vectorises (one running double sum cannot: the adds may not
// be reordered), converts 8x fewer values than a double lane sum, and does not depend on
// threads. Used for the rescaler and norm sums, whose references sum in float64.
template <class F>
static inline double lane_sum8(int n, F&& f) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    for (; j + 64 <= n; j += 64) {
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int r = 0; r < 8; ++r)
            for (int l = 0; l < 8; ++l) part[l] += f(j + 8 * r + l);
        for (int l = 0; l < 8; ++l) acc[l] += (double)part[l];
    }
    for (; j < n; ++j) acc[j & 7] += (double)f(j);
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// nearswap: w = clamp(t * (1 / max(|a - b|, 1e-6)), 0, 1), out = w b + (1 - w) a with
// a = base, b = model. Flags: {model, base, result} (result: some fp32 output value, before
// the rounding to out_dt, is inf or nan; likewise the last flag of ram_merge and scaled_copy).
std::vector<int> nearswap(uint64_t base, uint64_t model, int dt, uint64_t out, int out_dt, int64_t n,
                          float t, int nthreads);

// ram / ramplus_tl per-model counts over the tensor: {shared_0, unique_0, shared_1, ...}
// (nz_k = |m_k - base| > eps, c = sum_k nz_k; shared: nz_k and c > 1, unique: nz_k and c = 1),
// then the K + 1 flags.
std::vector<int64_t> ram_counts(uint64_t base, const std::vector<uint64_t>& models, int dt, int64_t n,
                                float eps, int nthreads);

// ram (lam empty): out = base + (sum_k nz_k d_k) / max(c, 1).
// ramplus_tl (lam[k] per model): out = base + sum_k (nz_k d_k) ([c = 1] lam_k + [c > 1] / c).
// Flags: K + 1, then the result's.
std::vector<int> ram_merge(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out,
                           int out_dt, int64_t n, float eps, const std::vector<float>& lam, int nthreads);

// passthrough: out = scale * x (scale 1 copies x exactly). Flags: {x, result}.
std::vector<int> scaled_copy(uint64_t x, int dt, uint64_t out, int out_dt, int64_t n, float scale,
                             int nthreads);

}  // namespace fm
