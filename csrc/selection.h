// The methods whose merge needs a selection over the whole tensor first (fastmerge/methods/):
// sce.cpp (top-k of the per-element variance) and arcee_fusion.cpp (quartiles of the
// importance). Inputs as in elementwise.h: read in place (fp32/fp16/bf16 `dt`), fp32 math,
// one output in `out_dt`; flags: one per input, the models in order, then the base.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

namespace fm {

// sce, select_topk >= 1: (sum_j d_k[j]^2 per model in double, flags).
std::tuple<std::vector<double>, std::vector<int>> sce_energy(uint64_t base, const std::vector<uint64_t>& models,
                                                             int dt, int64_t n, int nthreads);

// sce, 0 < select_topk < 1: (k, sum_j d_k[j]^2 keep[j] per model, flags); the keep bits of the
// exact top k (ties to the lowest index) into bits[ceil(n / 64)]. k = 0: nothing kept.
std::tuple<int64_t, std::vector<double>, std::vector<int>> sce_select(uint64_t base, const std::vector<uint64_t>& models,
                                                                      int dt, int64_t n, float topk, uint64_t bits,
                                                                      int nthreads);

// sce's merge with the weights w (K); mode 0: all kept, 1: the keep bits, 2: none kept.
void sce_merge(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out, int out_dt, int64_t n,
               const std::vector<float>& w, int mode, uint64_t bits, int nthreads);

// arcee_fusion over rows x L: (the order statistics ranks[q] of s, flags {model, base}); kl per
// row into kl[rows] (fp32).
std::tuple<std::vector<float>, std::vector<int>> arcee_select(uint64_t base, uint64_t model, int dt, int64_t rows,
                                                              int64_t L, const std::vector<int64_t>& ranks,
                                                              uint64_t kl, int nthreads);

// out = b + (m - b) [|m - b| kl_row >= thr]
void arcee_merge(uint64_t base, uint64_t model, int dt, uint64_t out, int out_dt, int64_t rows, int64_t L,
                 uint64_t kl, float thr, int nthreads);

}  // namespace fm
