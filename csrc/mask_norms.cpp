// Norms of each delta before and after its flat mask (top-k range or DARE's random drop), for
// mergekit's norm-matching rescale; random masks are also written as bits for the merge pass.
// Triton's counterpart: triton_kernels/mask_norms.py.
#include "common.h"
#include "kernels.h"
#include "masks.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fm {

constexpr int64_t NORM_CHUNK = 64;  // blocks per partial norm (thread-count independent sums)

// For flat masks (range / random). Random masks are also written as bits when bits[m] != 0.
// Returns 2 doubles per model: norm of d, norm of mask * d (L1, L2 or Linf).
std::vector<double> mask_norms(uint64_t base_ptr, const std::vector<uint64_t>& models, int dt, int64_t n,
                               const MaskArgs& a, const std::vector<uint64_t>& bits_out, int norm,
                               int nthreads) {
    const void* base = (const void*)base_ptr;
    const int K = (int)models.size();
    std::vector<double> out(2 * (size_t)K, 0.0);
    const int nt = threads_for(nthreads, n);
    const int64_t nblocks = (n + BLK - 1) / BLK;
    const PhiloxKey key = philox_key(a.seed);
    // Partial norms per fixed chunk of blocks, added in chunk order afterwards: the result does
    // not depend on the thread count (a merge split over processes with fewer threads each must
    // give the same bytes as one process).
    const int64_t nchunks = (nblocks + NORM_CHUNK - 1) / NORM_CHUNK;
    std::vector<double> part((size_t)nchunks * 2 * K, 0.0);
#pragma omp parallel num_threads(nt)
    {
        alignas(64) float bb[BLK], d[BLK], tmp[BLK + 4];
        alignas(64) uint32_t keep[BLK];
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; ++c) {
          double* acc = part.data() + (size_t)c * 2 * K;
          for (int64_t b = c * NORM_CHUNK; b < std::min(nblocks, (c + 1) * NORM_CHUNK); ++b) {
            const int64_t i0 = b * BLK;
            const int len = (int)std::min<int64_t>(BLK, n - i0);
            if (base) load_block(base, dt, i0, len, bb);
            for (int m = 0; m < K; ++m) {
                if (a.kind[m] != MASK_RANGE && a.kind[m] != MASK_RANDOM) continue;
                load_delta(base, (const void*)models[m], dt, i0, len, bb, d);
                eval_mask(a, key, m, i0, len, d, keep, tmp);
                double before = 0, after = 0;
                if (norm == NORM_L1) {
                    for (int j = 0; j < len; ++j) { const double v = std::fabs(d[j]); before += v; after += keep[j] ? v : 0.0; }
                } else if (norm == NORM_L2) {
                    for (int j = 0; j < len; ++j) { const double v = (double)d[j] * d[j]; before += v; after += keep[j] ? v : 0.0; }
                } else if (norm == NORM_LINF) {
                    for (int j = 0; j < len; ++j) { const double v = std::fabs(d[j]); before = std::max(before, v); after = std::max(after, keep[j] ? v : 0.0); }
                }
                if (norm == NORM_LINF) { acc[2 * m] = std::max(acc[2 * m], before); acc[2 * m + 1] = std::max(acc[2 * m + 1], after); }
                else { acc[2 * m] += before; acc[2 * m + 1] += after; }
                if (a.kind[m] == MASK_RANDOM && bits_out[m]) {
                    uint64_t* w = (uint64_t*)bits_out[m] + (i0 >> 6);
                    for (int wj = 0; wj < (len + 63) / 64; ++wj) {
                        uint64_t word = 0;
                        const int jmax = std::min(64, len - wj * 64);
                        for (int t = 0; t < jmax; ++t) word |= (uint64_t)(keep[wj * 64 + t] & 1u) << t;
                        w[wj] = word;
                    }
                }
            }
          }
        }
    }
    for (int64_t c = 0; c < nchunks; ++c) {
        const double* acc = part.data() + (size_t)c * 2 * K;
        for (int m = 0; m < 2 * K; ++m) out[m] = norm == NORM_LINF ? std::max(out[m], acc[m]) : out[m] + acc[m];
    }
    if (norm == NORM_L2)
        for (auto& v : out) v = std::sqrt(v);
    return out;
}

}  // namespace fm
