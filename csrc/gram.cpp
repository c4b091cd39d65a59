// The Gram pass of mergekit's other methods (see gram.h): K inputs read once, the K x K matrix of
// their dot products per vector, in double.
//
// Determinism: every product d_a[j] * d_b[j] is exact in double (24 + 24 significant bits), and
// the sums are formed in an order fixed by the data layout alone:
//  * vectors along contiguous runs (inner == 1): element j of a chunk goes to lane j % LANES of
//    that chunk's accumulator; a chunk is GRAM_CHUNK elements of one vector; the lanes are added
//    in lane order at the chunk's end and the chunks in chunk order at the end;
//  * vectors along dim 0 (inner > 1): each column's sum runs over l in order, and a thread
//    owns whole columns.
// So the Gram does not depend on the thread count, on the (dynamic) schedule, which hands out
// whole chunks or column blocks, or on the ISA build: setup.py builds with -ffp-contract=off,
// and the AVX2 loop's explicit fma of an exact product rounds as a multiply then an add do.
#include "gram.h"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fm {
namespace {

constexpr int LANES = 4;                                // independent double accumulators
constexpr int64_t GRAM_CHUNK = (int64_t)64 * GRAM_BLK;  // elements of one vector per partial sum
constexpr int64_t COL_BLOCK = 256;                      // columns per work item (inner > 1)

int pairs(int K) { return K * (K + 1) / 2; }

int threads(int requested, int64_t items) {
    return (int)std::max<int64_t>(1, std::min<int64_t>(requested > 0 ? requested : 1, items));
}

// acc[p * LANES + l] += d_a[j] d_b[j] for the pairs p = (a <= b) and the elements j = l mod
// LANES of the block, in j order: the generic form (any K, any ISA).
template <bool DELTA>
void accumulate_generic(const RowBlock& in, int n, double* __restrict acc) {
    const float* b = in.b;
    int p = 0;
    for (int a = 0; a < in.K; ++a) {
        for (int c = a; c < in.K; ++c, ++p) {
            const float* __restrict x = in.x[a];
            const float* __restrict y = in.x[c];
            double s[LANES];
            for (int l = 0; l < LANES; ++l) s[l] = acc[p * LANES + l];
            int j = 0;
            for (; j + LANES <= n; j += LANES)
                for (int l = 0; l < LANES; ++l)
                    s[l] += (double)(DELTA ? x[j + l] - b[j + l] : x[j + l]) *
                            (double)(DELTA ? y[j + l] - b[j + l] : y[j + l]);
            for (int l = 0; j + l < n; ++l)
                s[l] += (double)(DELTA ? x[j + l] - b[j + l] : x[j + l]) *
                        (double)(DELTA ? y[j + l] - b[j + l] : y[j + l]);
            for (int l = 0; l < LANES; ++l) acc[p * LANES + l] = s[l];
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
// The same sums for K <= 4 inputs, every pair per load of the K rows (register-blocked, one
// ymm accumulator of the LANES lanes per pair). An fma of the exact (48-bit) product of two
// floats rounds as the separate multiply and add of accumulate_generic do: the same bits.
template <int K, bool DELTA>
void accumulate_avx2(const RowBlock& in, int n, double* __restrict acc) {
    constexpr int P = K * (K + 1) / 2;
    __m256d s[P];
    for (int p = 0; p < P; ++p) s[p] = _mm256_loadu_pd(acc + p * LANES);
    const float* x[K];
    for (int k = 0; k < K; ++k) x[k] = in.x[k];
    const float* b = in.b;
    int j = 0;
    for (; j + LANES <= n; j += LANES) {
        __m256d v[K];
        __m128 bv = _mm_setzero_ps();
        if (DELTA) bv = _mm_loadu_ps(b + j);
        for (int k = 0; k < K; ++k) {
            __m128 f = _mm_loadu_ps(x[k] + j);
            if (DELTA) f = _mm_sub_ps(f, bv);
            v[k] = _mm256_cvtps_pd(f);
        }
        int p = 0;
        for (int a = 0; a < K; ++a)
            for (int c = a; c < K; ++c, ++p) s[p] = _mm256_fmadd_pd(v[a], v[c], s[p]);
    }
    for (int p = 0; p < P; ++p) _mm256_storeu_pd(acc + p * LANES, s[p]);
    int p = 0;  // the last partial group of LANES: element j + l to lane l
    for (int a = 0; a < K; ++a)
        for (int c = a; c < K; ++c, ++p)
            for (int l = 0; j + l < n; ++l)
                acc[p * LANES + l] += (double)(DELTA ? x[a][j + l] - b[j + l] : x[a][j + l]) *
                                      (double)(DELTA ? x[c][j + l] - b[j + l] : x[c][j + l]);
}

template <int K>
bool accumulate_fixed(const RowBlock& in, int n, double* acc) {
    if (in.b) accumulate_avx2<K, true>(in, n, acc);
    else accumulate_avx2<K, false>(in, n, acc);
    return true;
}
#endif

// The block's products into acc (LANES partial sums per pair; blocks start at multiples of
// LANES within a chunk, so lane l holds the chunk's elements l mod LANES, in order).
void accumulate_lanes(const RowBlock& in, int n, double* __restrict acc) {
#if defined(__AVX2__) && defined(__FMA__)
    switch (in.K) {
        case 1: accumulate_fixed<1>(in, n, acc); return;
        case 2: accumulate_fixed<2>(in, n, acc); return;
        case 3: accumulate_fixed<3>(in, n, acc); return;
        case 4: accumulate_fixed<4>(in, n, acc); return;
        default: break;
    }
#endif
    if (in.b) accumulate_generic<true>(in, n, acc);
    else accumulate_generic<false>(in, n, acc);
}

// Upper-triangle sums sums[v * P + p] -> full symmetric matrices out[v][K][K].
void scatter(const double* sums, int K, int64_t nvec, double* out) {
    const int P = pairs(K);
    for (int64_t v = 0; v < nvec; ++v) {
        const double* s = sums + v * P;
        double* g = out + v * K * K;
        int p = 0;
        for (int a = 0; a < K; ++a)
            for (int b = a; b < K; ++b, ++p) g[a * K + b] = g[b * K + a] = s[p];
    }
}

// Vectors along contiguous runs (inner == 1): outer vectors of `length` elements.
void gram_rows(uint64_t base, const std::vector<uint64_t>& xs, int dt, int64_t outer, int64_t length,
               double* out, int nthreads, std::vector<int>& flags) {
    const int K = (int)xs.size(), P = pairs(K);
    const int64_t nch = (length + GRAM_CHUNK - 1) / GRAM_CHUNK;
    const int64_t items = outer * nch;
    std::vector<double> part((size_t)std::max<int64_t>(items, 1) * P, 0.0);
#pragma omp parallel num_threads(threads(nthreads, items))
    {
        RowBlock in(base, xs, dt);
        std::vector<double> acc((size_t)P * LANES);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t o = it / nch, c = it % nch;
            const int64_t l0 = c * GRAM_CHUNK, l1 = std::min(length, l0 + GRAM_CHUNK);
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t l = l0; l < l1; l += GRAM_BLK) {
                const int n = (int)std::min<int64_t>(GRAM_BLK, l1 - l);
                in.load(o * length + l, n);
                accumulate_lanes(in, n, acc.data());
            }
            double* dst = part.data() + (size_t)it * P;
            for (int p = 0; p < P; ++p) {
                double s = 0.0;
                for (int l = 0; l < LANES; ++l) s += acc[p * LANES + l];
                dst[p] = s;
            }
        }
#pragma omp critical(fm_gram_flags)
        merge_row_flags(flags, in);
    }
    std::vector<double> sums((size_t)outer * P, 0.0);
    for (int64_t o = 0; o < outer; ++o)
        for (int64_t c = 0; c < nch; ++c)
            for (int p = 0; p < P; ++p) sums[(size_t)o * P + p] += part[(size_t)(o * nch + c) * P + p];
    scatter(sums.data(), K, outer, out);
}

// Vectors along dim 0 (inner > 1): a work item is COL_BLOCK columns of one outer slice, summed
// over l in order (the sums vectorize across columns).
void gram_cols(uint64_t base, const std::vector<uint64_t>& xs, int dt, int64_t outer, int64_t length,
               int64_t inner, double* out, int nthreads, std::vector<int>& flags) {
    const int K = (int)xs.size(), P = pairs(K);
    const int64_t ncb = (inner + COL_BLOCK - 1) / COL_BLOCK;
    const int64_t items = outer * ncb;
    std::vector<double> sums((size_t)outer * inner * P, 0.0);
#pragma omp parallel num_threads(threads(nthreads, items))
    {
        InputBlock in(base, xs, dt, true);
        std::vector<double> acc((size_t)P * COL_BLOCK);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t o = it / ncb, i0 = (it % ncb) * COL_BLOCK;
            const int w = (int)std::min<int64_t>(COL_BLOCK, inner - i0);
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t l = 0; l < length; ++l) {
                in.load((o * length + l) * inner + i0, w);
                int p = 0;
                for (int a = 0; a < K; ++a) {
                    for (int b = a; b < K; ++b, ++p) {
                        const float* __restrict x = in.x(a);
                        const float* __restrict y = in.x(b);
                        double* __restrict s = acc.data() + (size_t)p * COL_BLOCK;
                        for (int j = 0; j < w; ++j) s[j] += (double)x[j] * (double)y[j];
                    }
                }
            }
            for (int j = 0; j < w; ++j)
                for (int p = 0; p < P; ++p)
                    sums[(size_t)(o * inner + i0 + j) * P + p] = acc[(size_t)p * COL_BLOCK + j];
        }
#pragma omp critical(fm_gram_flags)
        merge_flags(flags, in);
    }
    scatter(sums.data(), K, outer * inner, out);
}

}  // namespace

std::vector<int> gram(uint64_t base, const std::vector<uint64_t>& xs, int dt, int64_t outer,
                      int64_t length, int64_t inner, uint64_t out, int nthreads) {
    std::vector<int> flags(xs.size() + 1, 0);
    double* g = (double*)out;
    if (inner == 1)
        gram_rows(base, xs, dt, outer, length, g, nthreads, flags);
    else
        gram_cols(base, xs, dt, outer, length, inner, g, nthreads, flags);
    return flags;
}

}  // namespace fm
