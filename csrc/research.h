// The research methods of issue 24 (fastmerge/methods/{consensus_ta,consensus_ties,pcb}.py,
// fastmerge/research.py define them): consensus.cpp (TALL masks, Consensus TA / TIES), emr.cpp,
// fisher.cpp, pcb.cpp. Inputs as in elementwise.h: read in place (fp32/fp16/bf16 `dt`), fp32
// math in the reference's operation order, one output in `out_dt`. Bit masks are packed as
// numpy.packbits packs a flat bool array: 8 elements a byte, the first in bit 7; task k's row
// of ceil(n / 8) bytes starts at bits + k * ceil(n / 8).
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

namespace fm {

// TALL masks m_k = |d_k| > lambda_k |mtl - d_k| (d_k = model_k - base; mtl: the tensor at `mtl`
// (fp32/fp16/bf16 dtype mtl_dt) or 0 for the TA vector sum_k d_k, or with `cuts` the TIES
// vector: model k keeps key > T_k or key == T_k and index <= J_k (cuts = {T_0, J_0, T_1, ...},
// keys the fp32 bits of |d_k|), the sign of the kept sum elected (>= 0: +), the agreeing kept
// values summed (normalize: divided by their count, at least 1)). Writes the packed masks into
// `bits` (0: none) and, with out != 0, out = base + lam * (mtl * [sum_k m_k >= kmin]).
// Flags: K + 1 (models, base), then mtl's, then the result's.
std::vector<int> consensus(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t mtl, int mtl_dt,
                           const std::vector<int64_t>& cuts, int normalize, const std::vector<float>& lambdas,
                           int kmin, float lam, uint64_t out, int out_dt, uint64_t bits, int64_t n, int nthreads);

// EMR: gamma = sum_k d_k > 0 ? 1 : -1, m_k = d_k gamma > 0, uni = gamma max_k |d_k m_k| (fp32,
// into `uni`), the packed m_k into `bits`; returns (sum_j |d_k[j]|, sum_j |uni[j] m_k[j]| per
// model in double, summed per block and the blocks in order; flags K + 1).
std::tuple<std::vector<double>, std::vector<double>, std::vector<int>>
emr(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t uni, uint64_t bits, int64_t n, int nthreads);

// Fisher: per Fisher sum_j F_k[j]^2 (double, blocks in order); flags: per Fisher 1 if inf/nan,
// 2 if negative.
std::tuple<std::vector<double>, std::vector<int>> fisher_sumsq(const std::vector<uint64_t>& fishers, int dt,
                                                              int64_t n, int nthreads);

// out = (sum_k (c_k (F_k + eps)) theta_k) / (sum_k c_k (F_k + eps)). Flags: K models, K Fishers
// (1 inf/nan, 2 negative), then the result's.
std::vector<int> fisher_merge(const std::vector<uint64_t>& models, int dt, const std::vector<uint64_t>& fishers,
                              int fdt, const std::vector<float>& coef, float eps, uint64_t out, int out_dt,
                              int64_t n, int nthreads);

// PCB (pcb.cpp): with the clamp bounds lo, hi per model, (q_k = the score's order statistic
// `rank` (0-based, ascending), M_k = its max, flags K + 1).
std::tuple<std::vector<float>, std::vector<float>, std::vector<int>>
pcb_select(uint64_t base, const std::vector<uint64_t>& models, int dt, int64_t n, const std::vector<float>& lo,
           const std::vector<float>& hi, int64_t rank, int nthreads);

// PCB's merge pass with q, M from pcb_select, per-model weights w and lam. Flags: K + 1, result.
std::vector<int> pcb_merge(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out, int out_dt,
                           int64_t n, const std::vector<float>& lo, const std::vector<float>& hi,
                           const std::vector<float>& q, const std::vector<float>& M, const std::vector<float>& w,
                           float lam, int nthreads);

}  // namespace fm
