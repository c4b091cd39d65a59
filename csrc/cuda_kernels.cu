// fastmerge CUDA kernels: the fused merge pass, exact top-k selection (per-block histograms,
// radix select, tie scan by lowest index), norms for mergekit's rescale, DELLA keep bytes.
//
// Semantics: fastmerge/reference.py. Arithmetic is fp32 with every multiply, add and divide
// rounded separately (__fmul_rn / __fadd_rn / __fsub_rn / __fdiv_rn never contract into FMAs,
// whatever the compiler flags), sums over models in model order, so results agree bit for bit
// with the cpu and triton backends. Random masks use Philox4x32-10 in the counter layout of
// fastmerge/philox.py: one call per group of four consecutive elements, so each thread of the
// merge pass owns one such group. Indices are 64-bit throughout.
//
// Argument structs are passed by value as __grid_constant__ kernel parameters (read in place
// from the parameter bank, even with dynamic indexing), so K inputs need no device copy of
// their pointers.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "cuda_kernels.h"
#include "philox_mask.h"

namespace fmcuda {
namespace {

constexpr int THREADS = 256;

// ---------------------------------------------------------------- element access

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ int64_t offset(const View& v, int64_t i, int64_t C, bool strided) {
    if (!strided) return i;
    const int64_t r = i / C;
    return r * v.s0 + (i - r * C) * v.s1;
}

template <typename T>
__device__ __forceinline__ float load(const View& v, int64_t i, int64_t C, bool strided) {
    return to_f32<T>(static_cast<const T*>(v.ptr)[offset(v, i, C, strided)]);
}

// Four consecutive elements i0..i0+3 (i0 a multiple of 4); lanes past n read as 0.
template <typename T> struct Vec4;
template <> struct Vec4<float> { using type = float4; };
template <> struct Vec4<__half> { using type = uint2; };
template <> struct Vec4<__nv_bfloat16> { using type = uint2; };

template <typename T>
__device__ __forceinline__ void load4(const View& v, int64_t i0, int64_t n, int64_t C, bool strided,
                                      bool vec, float out[4]) {
    if (vec && i0 + 3 < n) {
        const typename Vec4<T>::type raw =
            *reinterpret_cast<const typename Vec4<T>::type*>(static_cast<const T*>(v.ptr) + i0);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = to_f32<T>(e[j]);
        return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = i0 + j < n ? load<T>(v, i0 + j, C, strided) : 0.0f;
}

__device__ __forceinline__ bool nonfinite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

__device__ __forceinline__ uint32_t mag_key(float d) { return __float_as_uint(d) & 0x7fffffffu; }

__device__ __forceinline__ bool in_top(uint32_t key, int64_t i, int64_t T, int64_t J) {
    const int64_t k = (int64_t)key;
    return k > T || (k == T && i <= J);
}

// ---------------------------------------------------------------- Philox4x32-10: philox_mask.h

// Keep decisions (bit j for element i0 + j) of model m's mask on deltas d.
__device__ __forceinline__ uint32_t keep_bits(int kind, int m, const int64_t* thr, float prob,
                                              const uint8_t* keep, uint64_t seed, int64_t i0,
                                              int64_t n, const float d[4]) {
    uint32_t bits = 0;
    if (kind == MASK_NONE) return 0xfu;
    if (kind == MASK_RANGE) {
        const int64_t T1 = thr[4 * m], J1 = thr[4 * m + 1], T0 = thr[4 * m + 2], J0 = thr[4 * m + 3];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t k = mag_key(d[j]);
            bits |= (uint32_t)(in_top(k, i0 + j, T1, J1) && !in_top(k, i0 + j, T0, J0)) << j;
        }
    } else if (kind == MASK_RANDOM) {
        bits = fmphilox::random_keep4(seed, (uint32_t)m, i0, prob);
    } else if (kind == MASK_BITS) {
#pragma unroll
        for (int j = 0; j < 4; ++j) bits |= (uint32_t)(i0 + j < n && keep[i0 + j] != 0) << j;
    }
    return bits;  // MASK_ZERO: nothing kept
}

// ---------------------------------------------------------------- the fused merge pass

// One thread per group of four elements. Pass 1 over the models: masks, the elected-sign total,
// non-finite flags, and (without consensus) the sum. Pass 2, only with consensus: the disjoint
// sum, re-reading each input (L1/L2 hits) and reusing the keep bits of pass 1, so the K values
// never need to live in registers at once.
template <typename T, typename O>
__global__ void __launch_bounds__(THREADS) merge_kernel(const __grid_constant__ MergeArgs a) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t i0 = g * 4;
    if (i0 >= a.n) return;
    float b[4] = {0.f, 0.f, 0.f, 0.f};
    if (a.has_base) {
        load4<T>(a.base, i0, a.n, a.C, a.strided, a.vec, b);
        if (nonfinite(b[0]) || nonfinite(b[1]) || nonfinite(b[2]) || nonfinite(b[3])) a.flags[a.K] = 1;
    }
    float total[4] = {0.f, 0.f, 0.f, 0.f}, mixed[4] = {0.f, 0.f, 0.f, 0.f};
    uint64_t kept[4] = {0, 0, 0, 0};  // bit m: element j of model m is kept
    for (int m = 0; m < a.K; ++m) {
        float d[4];
        load4<T>(a.xs[m], i0, a.n, a.C, a.strided, a.vec, d);
        if (nonfinite(d[0]) || nonfinite(d[1]) || nonfinite(d[2]) || nonfinite(d[3])) a.flags[m] = 1;
        if (a.has_base) {
#pragma unroll
            for (int j = 0; j < 4; ++j) d[j] = __fsub_rn(d[j], b[j]);
        }
        const uint32_t bits = keep_bits(a.kinds[m], m, a.thr, a.probs[m], a.keeps[m], a.seed, i0, a.n, d);
        const float s = a.scale[m], w = a.weights[m];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            kept[j] |= (uint64_t)((bits >> j) & 1u) << m;
            float t = (bits >> j) & 1u ? d[j] : 0.0f;
            if (a.scale_mode == SCALE_MUL) t = __fmul_rn(t, s);
            else if (a.scale_mode == SCALE_DIV) t = __fdiv_rn(t, s);
            const float v = __fmul_rn(t, w);
            const float e = a.elect_weighted ? v : t;
            if (a.consensus == CONSENSUS_NONE) mixed[j] = __fadd_rn(mixed[j], v);
            else if (a.consensus == CONSENSUS_SUM) total[j] = __fadd_rn(total[j], e);
            else if (a.consensus == CONSENSUS_COUNT) total[j] = __fadd_rn(total[j], (float)((e > 0.0f) - (e < 0.0f)));
        }
    }
    if (a.consensus == CONSENSUS_GIVEN) {
#pragma unroll
        for (int j = 0; j < 4; ++j) total[j] = i0 + j < a.n && a.sign[i0 + j] > 0 ? 1.0f : -1.0f;
    }
    if (a.sign_only) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (i0 + j < a.n) a.sign[i0 + j] = total[j] >= 0.0f ? 1 : -1;
        return;
    }
    float div[4] = {0.f, 0.f, 0.f, 0.f};
    if (a.consensus != CONSENSUS_NONE) {
        for (int m = 0; m < a.K; ++m) {
            float d[4];
            load4<T>(a.xs[m], i0, a.n, a.C, a.strided, a.vec, d);
            const float s = a.scale[m], w = a.weights[m];
            const float wd = a.divisor == DIVISOR_COUNT ? 1.0f : w;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float t = a.has_base ? __fsub_rn(d[j], b[j]) : d[j];
                t = (kept[j] >> m) & 1u ? t : 0.0f;
                if (a.scale_mode == SCALE_MUL) t = __fmul_rn(t, s);
                else if (a.scale_mode == SCALE_DIV) t = __fdiv_rn(t, s);
                const float v = __fmul_rn(t, w);
                const float e = a.elect_weighted ? v : t;
                const bool agree = total[j] >= 0.0f ? e > 0.0f : e < 0.0f;
                mixed[j] = __fadd_rn(mixed[j], agree ? v : 0.0f);
                div[j] = __fadd_rn(div[j], agree ? wd : 0.0f);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (a.divisor == DIVISOR_COUNT) div[j] = div[j] < 1.0f ? 1.0f : div[j];
            else div[j] = div[j] == 0.0f ? 1.0f : div[j];
        }
    }
    O* out = static_cast<O*>(a.out);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        float r = mixed[j];
        if (a.normalize) {
            if (a.consensus != CONSENSUS_NONE) r = __fdiv_rn(r, div[j]);
            else if (a.divisor == DIVISOR_CONST) r = __fdiv_rn(r, a.const_div);
        }
        if (a.lam != 1.0f) r = __fmul_rn(r, a.lam);
        if (a.has_base) r = __fadd_rn(b[j], r);
        if (i0 + j < a.n) out[i0 + j] = from_f32<O>(r);
    }
}

// ---------------------------------------------------------------- radix select

template <typename T>
__device__ __forceinline__ uint32_t key_at(const SelectArgs& a, int m, int64_t i) {
    float d = load<T>(a.xs[m], i, a.C, a.strided);
    if (a.has_base) d = __fsub_rn(d, load<T>(a.base, i, a.C, a.strided));
    return mag_key(d);
}

__global__ void select_init_kernel(const __grid_constant__ SelectArgs a) {
    const int q = threadIdx.x;
    if (q < a.Q) {
        a.state[4 * q + 0] = 0;        // prefix (the digits chosen so far)
        a.state[4 * q + 1] = a.qk[q];  // rank still needed inside the prefix bucket
        a.state[4 * q + 2] = 0;        // keys equal to the final prefix (the threshold T)
        a.state[4 * q + 3] = 0;
    }
}

// Per-block shared-memory histogram of one digit of the keys that match the query's prefix,
// merged into the query's global histogram. grid.y = query.
template <typename T>
__global__ void __launch_bounds__(THREADS) radix_hist_kernel(const __grid_constant__ SelectArgs a,
                                                             int shift, int bits, int pshift) {
    __shared__ uint32_t h[RADIX_BINS];
    const int q = blockIdx.y;
    const int nb = 1 << bits;
    for (int t = threadIdx.x; t < nb; t += blockDim.x) h[t] = 0;
    __syncthreads();
    const int64_t prefix = a.state[4 * q];
    const uint32_t mask = (uint32_t)nb - 1u;
    bool bad = false;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const uint32_t key = key_at<T>(a, a.qm[q], i);
        bad |= key >= 0x7f800000u;
        if ((int64_t)(key >> pshift) == prefix) atomicAdd(&h[(key >> shift) & mask], 1u);
    }
    if (bad) *a.flag = 1;
    __syncthreads();
    for (int t = threadIdx.x; t < nb; t += blockDim.x)
        if (h[t]) atomicAdd(reinterpret_cast<unsigned long long*>(a.hist + (int64_t)q * RADIX_BINS + t),
                            (unsigned long long)h[t]);
}

// Highest digit whose suffix count reaches the needed rank; one thread per query.
__global__ void radix_choose_kernel(const __grid_constant__ SelectArgs a, int bits) {
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= a.Q) return;
    const int64_t* h = a.hist + (int64_t)q * RADIX_BINS;
    int64_t need = a.state[4 * q + 1], above = 0;
    int digit = (1 << bits) - 1;
    for (; digit > 0; --digit) {
        if (above + h[digit] >= need) break;
        above += h[digit];
    }
    a.state[4 * q + 0] = (a.state[4 * q + 0] << bits) | digit;
    a.state[4 * q + 1] = need - above;
    a.state[4 * q + 2] = h[digit];
}

// Keys equal to T per tile of SELECT_TILE elements, only for queries whose ties at T are split
// (other queries' blocks return at once, reading nothing). grid = (ntiles, Q).
template <typename T>
__global__ void __launch_bounds__(THREADS) tie_count_kernel(const __grid_constant__ SelectArgs a) {
    const int q = blockIdx.y;
    const int64_t need = a.state[4 * q + 1], eq = a.state[4 * q + 2];
    if (need >= eq) return;
    const int64_t Tq = a.state[4 * q];
    const int64_t start = (int64_t)blockIdx.x * SELECT_TILE;
    const int64_t stop = start + SELECT_TILE < a.n ? start + SELECT_TILE : a.n;
    int64_t c = 0;
    for (int64_t i = start + threadIdx.x; i < stop; i += blockDim.x)
        c += (int64_t)key_at<T>(a, a.qm[q], i) == Tq;
    using Reduce = cub::BlockReduce<int64_t, THREADS>;
    __shared__ typename Reduce::TempStorage tmp;
    const int64_t total = Reduce(tmp).Sum(c);
    if (threadIdx.x == 0) a.counts[(int64_t)q * a.ntiles + blockIdx.x] = total;
}

// The scan that breaks ties by lowest index: find the tile holding the need-th key equal to T
// (block-wide prefix sums over the tile counts), then the element inside it. One block per
// query; writes out[2q] = T and out[2q + 1] = J (J = n when every tie at T is kept).
template <typename T>
__global__ void __launch_bounds__(THREADS) tie_find_kernel(const __grid_constant__ SelectArgs a) {
    const int q = blockIdx.x;
    const int64_t Tq = a.state[4 * q], eq = a.state[4 * q + 2];
    int64_t need = a.state[4 * q + 1];
    if (threadIdx.x == 0) a.out[2 * q] = Tq;
    if (need >= eq) {
        if (threadIdx.x == 0) a.out[2 * q + 1] = a.n;
        return;
    }
    using Scan = cub::BlockScan<int64_t, THREADS>;
    __shared__ typename Scan::TempStorage tmp;
    // carry: matches counted before the current chunk; found/prior: the hit and the matches
    // before it. Every chunk reads carry, then a barrier, and only then may it be written.
    __shared__ int64_t found, carry, prior;
    if (threadIdx.x == 0) { found = -1; carry = 0; prior = 0; }
    __syncthreads();
    const int64_t* counts = a.counts + (int64_t)q * a.ntiles;
    // 1. the tile: first t with sum(counts[0..t]) >= need
    for (int64_t t0 = 0; t0 < a.ntiles; t0 += THREADS) {
        const int64_t t = t0 + threadIdx.x;
        const int64_t c = t < a.ntiles ? counts[t] : 0;
        int64_t incl, chunk;
        Scan(tmp).InclusiveSum(c, incl, chunk);
        const int64_t before = carry;
        __syncthreads();
        if (t < a.ntiles && c > 0 && before + incl >= need && before + incl - c < need) {
            found = t;
            prior = before + incl - c;  // ties before this tile
        }
        if (threadIdx.x == 0) carry = before + chunk;
        __syncthreads();
        if (found >= 0) break;
    }
    const int64_t tile = found;
    need -= prior;
    __syncthreads();
    if (threadIdx.x == 0) { found = -1; carry = 0; }
    __syncthreads();
    // 2. the element: the need-th key equal to T inside the tile, in index order
    const int64_t start = tile * SELECT_TILE;
    const int64_t stop = start + SELECT_TILE < a.n ? start + SELECT_TILE : a.n;
    for (int64_t i0 = start; i0 < stop; i0 += THREADS) {
        const int64_t i = i0 + threadIdx.x;
        const int64_t e = i < stop && (int64_t)key_at<T>(a, a.qm[q], i) == Tq ? 1 : 0;
        int64_t incl, chunk;
        Scan(tmp).InclusiveSum(e, incl, chunk);
        const int64_t before = carry;
        __syncthreads();
        if (e && before + incl == need) found = i;
        if (threadIdx.x == 0) carry = before + chunk;
        __syncthreads();
        if (found >= 0) break;
    }
    if (threadIdx.x == 0) a.out[2 * q + 1] = found;
}

// ---------------------------------------------------------------- norms

struct MaxOp {
    __device__ __forceinline__ double operator()(double x, double y) const { return x > y ? x : y; }
};

using ReduceD = cub::BlockReduce<double, THREADS>;

__device__ __forceinline__ double block_reduce(double v, bool use_max, ReduceD::TempStorage& tmp) {
    return use_max ? ReduceD(tmp).Reduce(v, MaxOp()) : ReduceD(tmp).Sum(v);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) mask_norms_kernel(const __grid_constant__ NormArgs a) {
    __shared__ ReduceD::TempStorage tmp;
    const bool use_max = a.norm == NORM_LINF;
    const int64_t groups = (a.n + 3) / 4;
    for (int m = 0; m < a.K; ++m) {
        if (a.kinds[m] != MASK_RANGE && a.kinds[m] != MASK_RANDOM) continue;
        double before = 0.0, after = 0.0;
        for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups;
             g += (int64_t)gridDim.x * blockDim.x) {
            const int64_t i0 = g * 4;
            float d[4], b[4] = {0.f, 0.f, 0.f, 0.f};
            load4<T>(a.xs[m], i0, a.n, a.C, a.strided, false, d);
            if (a.has_base) load4<T>(a.base, i0, a.n, a.C, a.strided, false, b);
#pragma unroll
            for (int j = 0; j < 4; ++j) d[j] = a.has_base ? __fsub_rn(d[j], b[j]) : d[j];
            const uint32_t bits = keep_bits(a.kinds[m], m, a.thr, a.probs[m], nullptr, a.seed, i0, a.n, d);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const double v = a.norm == NORM_L2 ? (double)d[j] * (double)d[j] : fabs((double)d[j]);
                const double k = (bits >> j) & 1u ? v : 0.0;
                if (use_max) { before = fmax(before, v); after = fmax(after, k); }
                else { before += v; after += k; }
            }
        }
        const double bsum = block_reduce(before, use_max, tmp);
        __syncthreads();
        const double asum = block_reduce(after, use_max, tmp);
        __syncthreads();
        if (threadIdx.x == 0) {
            a.partial[((int64_t)blockIdx.x * a.K + m) * 2] = bsum;
            a.partial[((int64_t)blockIdx.x * a.K + m) * 2 + 1] = asum;
        }
    }
}

// ---------------------------------------------------------------- DELLA keep bytes

template <typename T>
__global__ void __launch_bounds__(THREADS) della_keep_kernel(const __grid_constant__ DellaArgs a) {
    __shared__ ReduceD::TempStorage tmp;
    const bool use_max = a.norm == NORM_LINF;
    const float den = (float)(a.L - 1);
    double before = 0.0, after = 0.0;
    for (int64_t q = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; q < a.n;
         q += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = q / a.L, p = q - r * a.L;
        const int64_t t = a.order[q];
        const int64_t o = r / a.inner;
        const int64_t i = (o * a.L + t) * a.inner + (r - o * a.inner);
        float d = load<T>(a.x, i, a.C, a.strided);
        if (a.has_base) d = __fsub_rn(d, load<T>(a.base, i, a.C, a.strided));
        const float rn = a.L > 1 ? __fdiv_rn((float)(a.L - 1 - p), den) : 0.0f;
        const float prob = __fadd_rn(a.c1, __fmul_rn(rn, a.c2));
        const bool keep = fmphilox::random_keep1(a.seed, a.stream_id, i, prob);
        a.keep[i] = keep ? 1 : 0;
        const double v = a.norm == NORM_L2 ? (double)d * (double)d : fabs((double)d);
        const double k = keep ? v : 0.0;
        if (use_max) { before = fmax(before, v); after = fmax(after, k); }
        else { before += v; after += k; }
    }
    const double bsum = block_reduce(before, use_max, tmp);
    __syncthreads();
    const double asum = block_reduce(after, use_max, tmp);
    if (threadIdx.x == 0) {
        a.partial[(int64_t)blockIdx.x * 2] = bsum;
        a.partial[(int64_t)blockIdx.x * 2 + 1] = asum;
    }
}

// ---------------------------------------------------------------- host side

const char* check(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

int sm_count() {
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return 80;
    return sms > 0 ? sms : 80;
}

template <typename T, typename O>
void launch_merge(const MergeArgs& a, cudaStream_t s) {
    const int64_t groups = (a.n + 3) / 4;
    const int64_t blocks = (groups + THREADS - 1) / THREADS;
    merge_kernel<T, O><<<(unsigned)blocks, THREADS, 0, s>>>(a);
}

template <typename T>
void merge_out(const MergeArgs& a, cudaStream_t s) {
    if (a.sign_only || a.out_dtype == DTYPE_F32) launch_merge<T, float>(a, s);
    else if (a.out_dtype == DTYPE_F16) launch_merge<T, __half>(a, s);
    else launch_merge<T, __nv_bfloat16>(a, s);
}

template <typename T>
const char* select_typed(const SelectArgs& a, cudaStream_t s) {
    const int64_t want = (a.n + THREADS * 16 - 1) / (THREADS * 16);
    const int64_t cap = (int64_t)sm_count() * 8;
    const unsigned bx = (unsigned)(want < cap ? (want > 0 ? want : 1) : cap);
    select_init_kernel<<<1, MAX_Q, 0, s>>>(a);
    const int digits[3][2] = {{20, 11}, {10, 10}, {0, 10}};  // (shift, bits): 31-bit keys
    for (const auto& dg : digits) {
        if (const char* e = check(cudaMemsetAsync(a.hist, 0, sizeof(int64_t) * RADIX_BINS * a.Q, s))) return e;
        radix_hist_kernel<T><<<dim3(bx, a.Q), THREADS, 0, s>>>(a, dg[0], dg[1], dg[0] + dg[1]);
        radix_choose_kernel<<<(a.Q + 127) / 128, 128, 0, s>>>(a, dg[1]);
    }
    tie_count_kernel<T><<<dim3((unsigned)a.ntiles, a.Q), THREADS, 0, s>>>(a);
    tie_find_kernel<T><<<a.Q, THREADS, 0, s>>>(a);
    return nullptr;
}

}  // namespace

const char* merge(const MergeArgs& a, void* stream) {
    if (a.K < 1 || a.K > MAX_K) return "fastmerge cuda: K must be in [1, 64]";
    if (a.n <= 0) return nullptr;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a.dtype == DTYPE_F32) merge_out<float>(a, s);
    else if (a.dtype == DTYPE_F16) merge_out<__half>(a, s);
    else merge_out<__nv_bfloat16>(a, s);
    return check(cudaGetLastError());
}

const char* select(const SelectArgs& a, void* stream) {
    if (a.Q < 1 || a.Q > MAX_Q) return "fastmerge cuda: 1 to 128 selection queries per call";
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const char* err = a.dtype == DTYPE_F32 ? select_typed<float>(a, s)
                    : a.dtype == DTYPE_F16 ? select_typed<__half>(a, s) : select_typed<__nv_bfloat16>(a, s);
    return err ? err : check(cudaGetLastError());
}

const char* mask_norms(const NormArgs& a, void* stream) {
    if (a.K < 1 || a.K > MAX_K) return "fastmerge cuda: K must be in [1, 64]";
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a.dtype == DTYPE_F32) mask_norms_kernel<float><<<a.blocks, THREADS, 0, s>>>(a);
    else if (a.dtype == DTYPE_F16) mask_norms_kernel<__half><<<a.blocks, THREADS, 0, s>>>(a);
    else mask_norms_kernel<__nv_bfloat16><<<a.blocks, THREADS, 0, s>>>(a);
    return check(cudaGetLastError());
}

const char* della_keep(const DellaArgs& a, void* stream) {
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (a.dtype == DTYPE_F32) della_keep_kernel<float><<<a.blocks, THREADS, 0, s>>>(a);
    else if (a.dtype == DTYPE_F16) della_keep_kernel<__half><<<a.blocks, THREADS, 0, s>>>(a);
    else della_keep_kernel<__nv_bfloat16><<<a.blocks, THREADS, 0, s>>>(a);
    return check(cudaGetLastError());
}

}  // namespace fmcuda
