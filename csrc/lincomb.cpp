// The elementwise pass of mergekit's other methods (see gram.h): out = sum_k c_k x_k + c_b base
// (or of the deltas x_k - base), one coefficient per input and vector, fp32 math in input order,
// each input read once and the output written once, rounded to its dtype once.
#include "gram.h"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fm {

void advise_huge(void* p, int64_t bytes);  // kernels.cpp: huge pages for a fresh output buffer

namespace {

// res[j] = sum_k c[k][j * VEC] * x_k[j] (+ cb[j * VEC] * b[j]) for j < n: the coefficients are
// one scalar for the run (VEC = 0) or one per element (VEC = 1, vectors along dim 0).
template <int VEC>
void combine(InputBlock& in, int j0, int n, const float* const* c, const float* cb, float* __restrict res) {
    float* __restrict r = res + j0;
    const float* __restrict x0 = in.x(0) + j0;
    for (int j = 0; j < n; ++j) r[j] = c[0][j * VEC] * x0[j];
    for (int k = 1; k < in.K; ++k) {
        const float* __restrict xk = in.x(k) + j0;
        const float* __restrict ck = c[k];
        for (int j = 0; j < n; ++j) r[j] = r[j] + ck[j * VEC] * xk[j];
    }
    if (cb) {
        const float* __restrict b = in.b() + j0;
        for (int j = 0; j < n; ++j) r[j] = r[j] + cb[j * VEC] * b[j];
    }
}

// Vectors along contiguous runs (inner == 1): one coefficient per run, so the loops are
// scalar-times-vector over the block rows (read in place for fp32): res = c_0 d_0 + c_1 d_1 +
// ... (+ cb base), d_k = x_k (or x_k - base when DELTA), in this order, each step rounded.
template <bool DELTA>
void combine_run(const RowBlock& in, int j0, int n, const float* c, const float* cb,
                 float* __restrict res) {
    float* __restrict r = res + j0;
    const float* __restrict b = in.b ? in.b + j0 : nullptr;
    const float* __restrict x0 = in.x[0] + j0;
    const float c0 = c[0];
    if (DELTA)
        for (int j = 0; j < n; ++j) r[j] = c0 * (x0[j] - b[j]);
    else
        for (int j = 0; j < n; ++j) r[j] = c0 * x0[j];
    for (int k = 1; k < in.K; ++k) {
        const float* __restrict xk = in.x[k] + j0;
        const float ck = c[k];
        if (DELTA)
            for (int j = 0; j < n; ++j) r[j] = r[j] + ck * (xk[j] - b[j]);
        else
            for (int j = 0; j < n; ++j) r[j] = r[j] + ck * xk[j];
    }
    if (cb) {
        const float cbv = *cb;
        for (int j = 0; j < n; ++j) r[j] = r[j] + cbv * b[j];
    }
}

void lincomb_rows(uint64_t base, const std::vector<uint64_t>& xs, int dt, uint64_t out, int out_dt,
                  int64_t n, int64_t length, const float* cf, int64_t nvec, bool delta, int nt,
                  std::vector<int>& flags) {
    const int K = (int)xs.size();
    const int64_t nblocks = (n + GRAM_BLK - 1) / GRAM_BLK;
#pragma omp parallel num_threads(nt)
    {
        RowBlock in(base, xs, dt);
        std::vector<float> c((size_t)K);
        alignas(64) float res[GRAM_BLK];
        uint32_t out_bad = 0;
#pragma omp for schedule(dynamic, 16)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t i0 = blk * GRAM_BLK;
            const int len = (int)std::min<int64_t>(GRAM_BLK, n - i0);
            in.load(i0, len);
            for (int j = 0; j < len;) {  // runs of elements within one vector
                const int64_t i = i0 + j, v = i / length;
                const int m = (int)std::min<int64_t>(length - i % length, len - j);
                for (int k = 0; k < K; ++k) c[k] = cf[(size_t)k * nvec + v];
                const float* cb = base ? cf + (size_t)K * nvec + v : nullptr;
                if (delta) combine_run<true>(in, j, m, c.data(), cb, res);
                else combine_run<false>(in, j, m, c.data(), cb, res);
                j += m;
            }
            out_bad |= any_nonfinite(res, len);
            stream_block((void*)out, out_dt, i0, len, res);
        }
        stream_fence();
#pragma omp critical(fm_lincomb_flags)
        {
            merge_row_flags(flags, in);
            flags[K + 1] |= (int)out_bad;
        }
    }
}

}  // namespace

std::vector<int> lincomb(uint64_t base, const std::vector<uint64_t>& xs, int dt, uint64_t out,
                         int out_dt, int64_t outer, int64_t length, int64_t inner, uint64_t coef,
                         bool delta, int nthreads) {
    const int K = (int)xs.size();
    std::vector<int> flags((size_t)K + 2, 0);
    const int64_t n = outer * length * inner, nvec = outer * inner;
    if (n == 0 || K == 0) return flags;
    advise_huge((void*)out, n * (out_dt == DTYPE_F32 ? 4 : 2));
    const float* cf = (const float*)coef;
    const int64_t nblocks = (n + GRAM_BLK - 1) / GRAM_BLK;
    const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads > 0 ? nthreads : 1, nblocks));
    if (inner == 1) {
        lincomb_rows(base, xs, dt, out, out_dt, n, length, cf, nvec, delta && base != 0, nt, flags);
        return flags;
    }
#pragma omp parallel num_threads(nt)
    {
        InputBlock in(base, xs, dt, delta);
        std::vector<const float*> c((size_t)K);
        alignas(64) float res[GRAM_BLK];
        uint32_t out_bad = 0;
#pragma omp for schedule(dynamic, 16)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t i0 = blk * GRAM_BLK;
            const int len = (int)std::min<int64_t>(GRAM_BLK, n - i0);
            in.load(i0, len);
            // runs of elements within one vector (inner == 1) or one row of columns (inner > 1)
            for (int j = 0; j < len;) {
                const int64_t i = i0 + j;
                int64_t v, left;
                if (inner == 1) {
                    v = i / length;
                    left = length - i % length;
                } else {
                    const int64_t row = i / inner, col = i % inner;
                    v = (row / length) * inner + col;
                    left = inner - col;
                }
                const int m = (int)std::min<int64_t>(left, len - j);
                for (int k = 0; k < K; ++k) c[k] = cf + (size_t)k * nvec + v;
                const float* cb = base ? cf + (size_t)K * nvec + v : nullptr;
                if (inner == 1) combine<0>(in, j, m, c.data(), cb, res);
                else combine<1>(in, j, m, c.data(), cb, res);
                j += m;
            }
            out_bad |= any_nonfinite(res, len);
            store_block((void*)out, out_dt, i0, len, res);
        }
#pragma omp critical(fm_lincomb_flags)
        {
            merge_flags(flags, in);
            flags[K + 1] |= (int)out_bad;
        }
    }
    return flags;
}

}  // namespace fm
