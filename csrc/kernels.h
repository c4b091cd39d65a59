// Declarations of the CPU kernels (kernels.cpp) and their argument bundles.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace fm {
constexpr int BLK = 512;  // elements per block: a multiple of 64 (bit words) and 4 (Philox)
std::vector<int64_t> select_ranges(uint64_t, const std::vector<uint64_t>&, int, int64_t,
                                   const std::vector<int>&, const std::vector<int64_t>&, int);
// Per-model masks: kind (MaskKind), 4 range thresholds per model (T_stop, J_stop, T_start,
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
    int scale_mode;
    int consensus;
    bool elect_weighted;
    int divisor;
    float const_div;
    bool normalize;
    float lam;
    bool sign_only;
};
std::vector<double> mask_norms(uint64_t, const std::vector<uint64_t>&, int, int64_t, const MaskArgs&,
                               const std::vector<uint64_t>&, int, int);
std::vector<double> della_bits(uint64_t, const std::vector<uint64_t>&, int, int64_t, int64_t, int64_t,
                               const std::vector<int>&, const std::vector<float>&, const std::vector<float>&,
                               uint64_t, const std::vector<uint64_t>&, int, int);
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
    // fused quantizer must see to equal quantize(merge(..., out_dtype)). F32: no rounding.
    int round_dt_ = F32;
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

// ---- quantizers (quant.cpp); formats documented in fastmerge/quant.py ----
enum QuantKind : int { Q_INT4_GPTQ = 0, Q_INT4_TORCHAO = 1, Q_FP8 = 2 };
enum Granularity : int { G_TENSOR = 0, G_ROW = 1, G_BLOCK = 2 };
struct QuantArgs {
    int kind;
    int64_t rows, cols;    // the weight is [rows = out features, cols = in features]
    int group;             // INT4 group size along cols
    bool sym;
    int fmt;               // FP8: 0 = e4m3fn, 1 = e5m2
    int gran;              // FP8 granularity
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
int max_threads();
// madvise(MADV_HUGEPAGE) on an untouched output of at least 8 MiB (kernels.cpp)
void advise_huge(void* p, int64_t bytes);
}  // namespace fm
