// Declarations of the CPU kernels (kernels.cpp) and their argument bundles.
#pragma once

#include <cstdint>
#include <vector>

namespace fm {
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
std::vector<int> fused_merge(uint64_t, const std::vector<uint64_t>&, int, uint64_t, int, int64_t,
                             const MaskArgs&, const MergeArgs&, uint64_t, int);
int max_threads();
}  // namespace fm
