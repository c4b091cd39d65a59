// Declarations of the CPU kernels and their argument bundles (C++17 + OpenMP). Semantics:
// fastmerge/reference.py; every sum over models runs in model order in fp32, exactly like the
// reference, so results agree bit for bit (or within an ulp where a norm ratio rounds
// differently). One file per pass, named as in triton_kernels/:
//
// Passes of a merge (N elements, K inputs, base optional):
//   magnitude_select.cpp : select_ranges: exact top-k thresholds by radix select on the fp32
//                   bit patterns of |d| (a 16-bit histogram pass, a 16-bit pass restricted to
//                   the chosen bucket, and, only when ties at the threshold are split, a count
//                   pass that finds the index cutoff). No sort, no mask.
//   mask_norms.cpp : only for norm-matching rescale: per-model norms before/after masking;
//                   random (DARE) masks are written as bits so the merge pass need not redraw.
//   della.cpp     : della_bits: per-row ranks by LSD radix sort (one sort, not mergekit's double
//                   argsort), DELLA keep decisions as bits, norms.
//   select_merge.cpp : the TIES family (range masks, no rescale) in one pass: the top-k
//                   thresholds bracketed from a sample, the merge done with the sure decisions,
//                   the few elements inside a bracket merged again from records once the exact
//                   thresholds are known. Replaces select_ranges + fused_merge from 2^20 elements.
//   fused_merge.cpp : reads base + K inputs once, writes the output once. Masks are evaluated
//                   on the fly (masks.h) from thresholds, Philox counters or bits. The
//                   per-block work is MergeBlock's, which quant.cpp's fused quantizers share;
//                   mask-free plans (task arithmetic, linear) take a register-resident path.
//   quant.cpp     : the quantizers (formats: quant.h) and the fused merge -> quantize.
// Shared inline helpers: common.h (dtypes, blocks, Philox, threads), masks.h (keep decisions).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace fm {
// ---- exact top-k thresholds (magnitude_select.cpp) ----
// Queries (model q_model[q], k q_k[q]): T and J per query (key > T or key == T and index <= J
// is the top set), then a flag: a non-finite value was seen. Tensors are (pointer, DTYPE_*).
std::vector<int64_t> select_ranges(uint64_t, const std::vector<uint64_t>&, int, int64_t,
                                   const std::vector<int>&, const std::vector<int64_t>&, int);

// ---- the argument bundles of the mask and merge passes ----
// Per-model masks: kind (MASK_*), 4 range thresholds per model (T_stop, J_stop, T_start,
// J_start), keep probability, bit-mask pointers, Philox seed.
struct MaskArgs {
    std::vector<int> kind;
    std::vector<int64_t> ranges;
    std::vector<float> p;
    std::vector<uint64_t> bits;
    uint64_t seed;
};
// How masked deltas combine (see fastmerge/reference.py for the formulas).
struct MergeArgs {
    std::vector<float> weights;
    std::vector<float> scale;
    int scale_mode;  // SCALE_*
    int consensus;   // CONSENSUS_*
    bool elect_weighted;
    int divisor;     // DIVISOR_*
    float const_div;
    bool normalize;
    float lam;
    bool sign_only;
};

// ---- norms before/after flat masks (mask_norms.cpp); NORM_* ----
std::vector<double> mask_norms(uint64_t, const std::vector<uint64_t>&, int, int64_t, const MaskArgs&,
                               const std::vector<uint64_t>&, int, int);
// ---- DELLA keep bits and norms (della.cpp) ----
std::vector<double> della_bits(uint64_t, const std::vector<uint64_t>&, int, int64_t, int64_t, int64_t,
                               const std::vector<int>&, const std::vector<float>&, const std::vector<float>&,
                               uint64_t, const std::vector<uint64_t>&, int, int);

// ---- the fused merge (fused_merge.cpp) ----
// One worker's fused merge: the merged fp32 values of elements i0 .. i0+len-1 (len <= BLK),
// computed from base + K inputs with thread-private buffers. fused_merge stores them; the fused
// quantizers (quant.cpp) quantize them without ever writing the merged tensor.
class MergeBlock {
public:
    MergeBlock(uint64_t base, const std::vector<uint64_t>& models, int dt, const MaskArgs& ma,
               const MergeArgs& a, uint64_t sign);
    // false when the plan only elects signs (nothing to store)
    bool run(int64_t i0, int len, float* mixed);
    // Software prefetch of elements i0 .. i0+len-1 of every input. A fused quantizer computes
    // for a while between merged rows; the hardware prefetcher, driven by demand loads, idles
    // then, so the quantizer asks for the next row a piece at a time while it works.
    void prefetch(int64_t i0, int len) const;
    std::vector<int> bad;  // non-finite values seen: per input, in base, in some input (see run)
    // Round the merged values to this dtype (and back to fp32) before handing them out: what a
    // fused quantizer must see to equal quantize(merge(..., out_dtype)). DTYPE_F32: no rounding.
    int round_dt_ = DTYPE_F32;
    // Mask-free plans check their merged values for inf/nan (see run); a fused quantizer that
    // checks them itself turns this off.
    bool check_result_ = true;

private:
    void finish(int len, float* mixed, bool have_div);
    void run_plain(int64_t i0, int len, float* mixed);
    const void* base_;
    const std::vector<uint64_t>& models_;
    int dt_, K_;
    const MaskArgs& ma_;
    const MergeArgs& a_;
    int8_t* sign_;
    PhiloxKey key_;
    bool need_s_, plain_;  // plain: no masks, rescale or consensus (task arithmetic, linear)
    std::vector<float> V_, S_;
    alignas(64) float bb_[BLK], d_[BLK], tmp_[BLK + 4], total_[BLK], div_[BLK];
    alignas(64) uint32_t keep_[BLK];
};
std::vector<int> fused_merge(uint64_t, const std::vector<uint64_t>&, int, uint64_t, int, int64_t,
                             const MaskArgs&, const MergeArgs&, uint64_t, int);

// ---- the TIES family in one pass (select_merge.cpp) ----
// Range masks given as k_stop / k_start per model (keep: in the top k_stop, not in the top
// k_start), no rescale, consensus NONE/SUM/COUNT: selection and merge in one streaming pass.
// Returns {status (0 merged, 1 bracket missed, 2 unsupported), the K+2 flags of fused_merge}.
constexpr int SELECT_MERGE_KMAX = 16;
std::vector<int> select_merge(uint64_t base, const std::vector<uint64_t>& models, int dt, uint64_t out, int out_dt,
                              int64_t n, const std::vector<int64_t>& k_stop, const std::vector<int64_t>& k_start,
                              const MergeArgs& a, int nthreads);

// ---- quantizers (quant.cpp); formats documented in fastmerge/quant.py ----
struct QuantArgs {
    int kind;              // QUANT_*
    int64_t rows, cols;    // the weight is [rows = out features, cols = in features]
    int group;             // INT4 group size along cols
    bool sym;
    int fmt;               // FP8: FP8_FORMAT_*
    int gran;              // FP8: GRANULARITY_*
    int64_t br, bc;        // FP8 block
    int value_dt;          // values are rounded to this dtype first; torchao scale/zero dtype
    uint64_t out0, out1, out2;  // gptq: qweight, qzeros, scales; torchao: qdata, scale, zero; fp8: q, scale
};
// Returns {non-finite values, fp16 scale overflow}.
std::vector<int> quantize(uint64_t src, int dt, const QuantArgs& q, int nthreads);
// Returns the K+2 input flags of fused_merge, then the two flags of quantize().
std::vector<int> fused_merge_quantize(uint64_t base, const std::vector<uint64_t>& models, int dt,
                                      const MaskArgs& ma, const MergeArgs& a, const QuantArgs& q,
                                      int nthreads);
}  // namespace fm
