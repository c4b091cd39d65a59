// DELLA's keep decisions (della_bits): per-row ranks by LSD radix sort (one sort, not
// mergekit's double argsort), keep bits from Philox uniforms against the rank's probability,
// and the norms mergekit's rescale needs. Triton's counterpart: triton_kernels/della.py.
#include "common.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fm {

// ================================ DELLA keep bits ========================================
// Rows along dim 1: element (o, t, j) at flat (o*len + t)*inner + j. Within each row, rank by
// (|d| descending, index ascending) with a stable LSD radix sort of the 31-bit keys; ascending
// rank a = len-1-pos; keep iff u < c1 + (a / (len-1)) * c2. Bits are ORed into zeroed buffers.
std::vector<double> della_bits(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt,
                               int64_t outer, int64_t len, int64_t inner,
                               const std::vector<int>& which, const std::vector<float>& c1,
                               const std::vector<float>& c2, uint64_t seed,
                               const std::vector<uint64_t>& bits_out, int norm, int nthreads) {
    const void* base = (const void*)base_ptr;
    const int K = (int)models.size();
    std::vector<double> out(2 * (size_t)K, 0.0);
    const int64_t rows = outer * inner;
    const int64_t n = rows * len;
    if (n == 0) return out;
    const PhiloxKey key = philox_key(seed);
    int nt = nthreads > 0 ? nthreads : 1;
    if (rows < nt) nt = (int)rows;
    for (int m : which) {
        const void* x = (const void*)models[m];
        uint64_t* bits = (uint64_t*)bits_out[m];
        std::vector<double> part(2 * (size_t)rows, 0.0);  // per row, summed in row order below
#pragma omp parallel num_threads(nt)
        {
            std::vector<float> d(len), u(len + 12);
            std::vector<uint32_t> keys(len), ia(len), ib(len);
            std::vector<uint64_t> rowbits(len / 64 + 2);
            std::vector<uint32_t> cnt(2048);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                const int64_t o = r / inner, jj = r % inner;
                const int64_t first = o * len * inner + jj;  // flat index of t = 0
                for (int64_t t = 0; t < len; ++t) {
                    const int64_t i = first + t * inner;
                    float v = load_one(x, dt, i);
                    if (base) v = v - load_one(base, dt, i);
                    d[t] = v;
                    keys[t] = 0x7fffffffu - mag_key(v);  // ascending order = descending |d|
                    ia[t] = (uint32_t)t;
                }
                // stable LSD radix sort of indices by keys: digits of 11, 10, 10 bits
                const int shifts[3] = {0, 11, 21}, widths[3] = {11, 10, 10};
                uint32_t* src = ia.data();
                uint32_t* dst = ib.data();
                for (int pass = 0; pass < 3; ++pass) {
                    const int nb = 1 << widths[pass];
                    const uint32_t mask = (uint32_t)nb - 1;
                    std::fill(cnt.begin(), cnt.begin() + nb, 0u);
                    for (int64_t t = 0; t < len; ++t) cnt[(keys[src[t]] >> shifts[pass]) & mask]++;
                    if (cnt[(keys[src[0]] >> shifts[pass]) & mask] == (uint32_t)len) continue;  // one digit
                    uint32_t sum = 0;
                    for (int b = 0; b < nb; ++b) { const uint32_t c = cnt[b]; cnt[b] = sum; sum += c; }
                    for (int64_t t = 0; t < len; ++t) { const uint32_t e = src[t]; dst[cnt[(keys[e] >> shifts[pass]) & mask]++] = e; }
                    std::swap(src, dst);
                }
                // uniforms of the row's elements (contiguous rows: the vectorised block generator)
                const float* uf = u.data();
                if (inner == 1) {
                    const int64_t a0 = first & ~(int64_t)3;
                    const int off = (int)(first - a0);
                    philox_uniform_block(key, a0, (int)(len + off), (uint32_t)m, u.data());
                    uf = u.data() + off;
                } else {
                    for (int64_t t = 0; t < len; ++t) {
                        const int64_t i = first + t * inner;
                        uint32_t w[4];
                        philox(key, (uint64_t)i >> 2, (uint32_t)m, w);
                        u[t] = (float)(w[i & 3] >> 8) * UNIFORM_SCALE;
                    }
                }
                std::fill(rowbits.begin(), rowbits.end(), 0ull);
                const float den = (float)(len - 1);
                const int shift0 = inner == 1 ? (int)(first & 63) : 0;
                double before = 0, after = 0;
                for (int64_t pos = 0; pos < len; ++pos) {
                    const uint32_t t = src[pos];
                    const float rn = len > 1 ? (float)(len - 1 - pos) / den : 0.0f;
                    const float prod = rn * c2[m];
                    const float p = c1[m] + prod;
                    const bool keep = uf[t] < p;
                    const double v = norm == NORM_L2 ? (double)d[t] * d[t] : std::fabs((double)d[t]);
                    if (norm == NORM_LINF) { before = std::max(before, v); if (keep) after = std::max(after, v); }
                    else { before += v; if (keep) after += v; }
                    if (keep) {
                        if (inner == 1) rowbits[(t + shift0) >> 6] |= 1ull << ((t + shift0) & 63);
                        else {
                            const int64_t i = first + (int64_t)t * inner;
                            __atomic_fetch_or(bits + (i >> 6), 1ull << (i & 63), __ATOMIC_RELAXED);
                        }
                    }
                }
                if (inner == 1) {
                    const int64_t w0 = first >> 6;
                    const int64_t nw = (shift0 + len + 63) / 64;
                    for (int64_t w = 0; w < nw; ++w)
                        if (rowbits[w]) __atomic_fetch_or(bits + w0 + w, rowbits[w], __ATOMIC_RELAXED);
                }
                part[2 * r] = before;
                part[2 * r + 1] = after;
            }
        }
        double before_all = 0, after_all = 0;
        for (int64_t r = 0; r < rows; ++r) {
            if (norm == NORM_LINF) { before_all = std::max(before_all, part[2 * r]); after_all = std::max(after_all, part[2 * r + 1]); }
            else { before_all += part[2 * r]; after_all += part[2 * r + 1]; }
        }
        if (norm == NORM_L2) { before_all = std::sqrt(before_all); after_all = std::sqrt(after_all); }
        out[2 * m] = before_all;
        out[2 * m + 1] = after_all;
    }
    return out;
}

}  // namespace fm
