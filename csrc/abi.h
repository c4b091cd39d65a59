// GENERATED from fastmerge/abi.py by `python -m fastmerge.abi > csrc/abi.h`: do not edit.
// The integer codes the Python drivers pass to the C++, CUDA and Triton kernels;
// tests/test_abi.py checks that this file is what fastmerge/abi.py generates.
#pragma once

#include <cstdint>

namespace fm {

enum Dtype : int { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2, DTYPE_I8 = 3 };
enum Mask : int { MASK_NONE = 0, MASK_ZERO = 1, MASK_RANGE = 2, MASK_RANDOM = 3, MASK_BITS = 4 };
enum Norm : int { NORM_NONE = 0, NORM_L1 = 1, NORM_L2 = 2, NORM_LINF = 3 };
enum Consensus : int { CONSENSUS_NONE = 0, CONSENSUS_SUM = 1, CONSENSUS_COUNT = 2, CONSENSUS_GIVEN = 3 };
enum Divisor : int { DIVISOR_NONE = 0, DIVISOR_WEIGHT = 1, DIVISOR_COUNT = 2, DIVISOR_CONST = 3 };
enum Scale : int { SCALE_NONE = 0, SCALE_MUL = 1, SCALE_DIV = 2 };
enum Quant : int { QUANT_INT4_GPTQ = 0, QUANT_INT4_TORCHAO = 1, QUANT_FP8 = 2 };
enum Granularity : int { GRANULARITY_TENSOR = 0, GRANULARITY_ROW = 1, GRANULARITY_BLOCK = 2 };
enum Fp8Format : int { FP8_FORMAT_E4M3FN = 0, FP8_FORMAT_E5M2 = 1 };

constexpr int64_t NONE_T = (int64_t)1 << 32;  // threshold no 31-bit key exceeds: empty top set
constexpr int MAX_K = 64;  // inputs per GPU merge (keep decisions in 64-bit masks)

}  // namespace fm
