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

namespace fmcuda {

constexpr int MAX_K = 64;           // inputs per merge (keep decisions live in 64-bit masks)
constexpr int MAX_Q = 2 * MAX_K;    // selection queries per call (two per range mask)
constexpr int RADIX_BINS = 2048;    // histogram bins of the widest radix digit (11 bits)

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };
enum Kind : int { K_NONE = 0, K_ZERO = 1, K_RANGE = 2, K_RANDOM = 3, K_BYTES = 4 };
enum Consensus : int { C_NONE = 0, C_SUM = 1, C_COUNT = 2, C_GIVEN = 3 };
enum Divisor : int { D_NONE = 0, D_WEIGHT = 1, D_COUNT = 2, D_CONST = 3 };
enum ScaleMode : int { S_NONE = 0, S_MUL = 1, S_DIV = 2 };
enum Norm : int { N_L1 = 1, N_L2 = 2, N_LINF = 3 };

// A tensor read by logical (row-major) flat index i: at (i / C) * s0 + (i % C) * s1 when
// `strided`, at i otherwise (C is the last dimension, shared by every input of a call).
struct View {
    const void* ptr;
    int64_t s0, s1;
};

// The fused merge pass (semantics: fastmerge/reference.py; codes: fastmerge/gpu.py).
struct MergeArgs {
    int K, dtype, out_dtype;
    bool has_base, strided, vec;        // vec: contiguous, 4-element-aligned (vector loads)
    View base;
    View xs[MAX_K];
    const uint8_t* keeps[MAX_K];        // K_BYTES: one keep byte per element
    int kinds[MAX_K];
    float weights[MAX_K], probs[MAX_K];
    void* out;                          // out_dtype, contiguous (unused when sign_only)
    int8_t* sign;                       // C_GIVEN: elected sign (in); sign_only: (out)
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

// Norms of each delta before/after its flat mask (K_RANGE, K_RANDOM; other kinds skipped):
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
