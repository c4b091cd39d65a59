// fastmerge CUDA kernels: argument bundles and host launchers (csrc/cuda_kernels.cu).
//
// Plain C++ types only (no CUDA, torch or Python headers), so the pybind11 binding
// (csrc/cuda_bindings.cpp) compiles with any C++17 compiler and the kernels compile with nvcc
// alone (`nvcc -Icsrc -c csrc/cuda_kernels.cu`, as .ci/run does). Tensors cross as raw device
// pointers, like the CPU module: nothing here links against libtorch.
//
// Every launcher enqueues work on `stream` (a cudaStream_t passed as void*) and returns
// nullptr on success or a static error message; none synchronises with the host.
#pragma once

#include <cstdint>

#include "abi.h"

namespace fmcuda {

// The integer codes (DTYPE_*, MASK_*, CONSENSUS_*, DIVISOR_*, SCALE_*, NORM_*) and MAX_K, the
// inputs per merge (keep decisions live in 64-bit masks): abi.h, generated from fastmerge/abi.py.
using namespace fm;

constexpr int MAX_Q = 2 * MAX_K;    // selection queries per call (two per range mask)
constexpr int RADIX_BINS = 2048;    // histogram bins of the widest radix digit (11 bits)

// A tensor read by logical (row-major) flat index i: at (i / C) * s0 + (i % C) * s1 when
// `strided`, at i otherwise (C is the last dimension, shared by every input of a call).
struct View {
    const void* ptr;
    int64_t s0, s1;
};

// The fused merge pass (semantics: fastmerge/reference.py; codes: abi.h).
struct MergeArgs {
    int K, dtype, out_dtype;
    bool has_base, strided, vec;        // vec: contiguous, 4-element-aligned (vector loads)
    View base;
    View xs[MAX_K];
    const uint8_t* keeps[MAX_K];        // MASK_BITS: one keep byte per element
    int kinds[MAX_K];
    float weights[MAX_K], probs[MAX_K];
    void* out;                          // out_dtype, contiguous (unused when sign_only)
    int8_t* sign;                       // CONSENSUS_GIVEN: elected sign (in); sign_only: (out)
    int32_t* flags;                     // K + 1: non-finite value seen in input m (last: base)
    const int64_t* thr;                 // [K, 4]: T_stop, J_stop, T_start, J_start
    const float* scale;                 // [K]
    uint64_t seed;
    int64_t n, C;
    int scale_mode, consensus, divisor;
    bool elect_weighted, normalize, sign_only;
    float const_div, lam;
};

// Exact top-k selection (histogram radix select + tie scan), queries (qm[q], qk[q]) with
// 0 < qk[q] < n. Writes out[2q] = T, out[2q + 1] = J. Workspace (device, caller-allocated):
// hist [Q * RADIX_BINS] int64, state [Q * 4] int64, counts [Q * ntiles] int64 with
// ntiles = ceil(n / SELECT_TILE).
constexpr int64_t SELECT_TILE = 8192;
struct SelectArgs {
    int K, dtype, Q;
    bool has_base, strided;
    View base;
    View xs[MAX_K];
    int qm[MAX_Q];
    int64_t qk[MAX_Q];
    int64_t n, C, ntiles;
    int64_t* out;
    int32_t* flag;                      // set to 1 when a queried delta holds inf/nan
    int64_t* hist;
    int64_t* state;
    int64_t* counts;
};

// Norms of each delta before/after its flat mask (MASK_RANGE, MASK_RANDOM; others skipped):
// partial [blocks, K, 2] fp64, one row per block, reduced by the caller.
struct NormArgs {
    int K, dtype, norm, blocks;
    bool has_base, strided;
    View base;
    View xs[MAX_K];
    int kinds[MAX_K];
    float probs[MAX_K];
    const int64_t* thr;
    uint64_t seed;
    int64_t n, C;
    double* partial;
};

// DELLA keep bytes from each row's priority order (order [rows, L] int64, positions within
// the row), and norms: partial [blocks, 2] fp64.
struct DellaArgs {
    int dtype, norm, blocks;
    uint32_t stream_id;
    bool has_base, strided;
    View base, x;
    const int64_t* order;
    uint8_t* keep;
    double* partial;
    float c1, c2;
    uint64_t seed;
    int64_t n, L, inner, C;
};

const char* merge(const MergeArgs& a, void* stream);
const char* select(const SelectArgs& a, void* stream);
const char* mask_norms(const NormArgs& a, void* stream);
const char* della_keep(const DellaArgs& a, void* stream);

}  // namespace fmcuda
